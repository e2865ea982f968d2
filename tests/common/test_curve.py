"""tcp sockets: bound on the configured interface, and with the engine's CURVE key only its holders get through."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import time

import pytest
import zmq

from headrace.common import codec, curve, transport
from headrace.common.addresses import Endpoint, address_plan
from headrace.common.config import ConfigError, ServerConfig
from headrace.common.messages import AbortRequest, Heartbeat, Shutdown

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")

TIMEOUT_MS = 5000
REFUSED_WAIT_MS = 1500  # long enough for a handshake on loopback to have finished many times over


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def key_file(tmp_path) -> str:
    path = str(tmp_path / "engine.key")
    curve.write_new_key_file(path)
    return path


def endpoint(port: int, key_file: str | None) -> Endpoint:
    address = f"tcp://127.0.0.1:{port}"
    return Endpoint(bind=address, connect=address, curve_key_file=key_file)


def stranger(ctx: zmq.Context, address: str, *, server_key: bytes | None,
             own: tuple[bytes, bytes] | None) -> zmq.Socket:
    """A DEALER set up by hand, as an attacker would: it may know the engine's public key, not its secret."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if server_key is not None:
        public, secret = own or zmq.curve_keypair()
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.connect(address)
    return sock


def test_only_peers_holding_the_engine_key_get_a_message_through(ctx, key_file, tmp_path, caplog):
    ep = endpoint(free_port(), key_file)
    router = transport.router_socket(ctx, ep)
    engine = curve.read_key_file(key_file)
    other_file = str(tmp_path / "other.key")
    curve.write_new_key_file(other_file)
    _, other_secret = zmq.curve_keypair()
    intruders = [
        transport.dealer_socket(ctx, ep.connect, b"plain"),  # no CURVE at all
        transport.dealer_socket(ctx, Endpoint(ep.bind, ep.connect, other_file), b"other-key"),  # another engine's key
        stranger(ctx, ep.connect, server_key=engine.public, own=None),  # knows the public key, has its own pair
        stranger(ctx, ep.connect, server_key=engine.public, own=(engine.public, other_secret)),  # claims ours
    ]
    with caplog.at_level(logging.WARNING, logger="headrace.curve"):
        for sock in intruders:
            sock.send(codec.encode(Shutdown()))
        assert transport.router_recv(router, REFUSED_WAIT_MS) is None, "a peer without the key got through"
    assert "does not hold the engine's CURVE key" in caplog.text  # the owner says why it refuses

    peer = transport.dealer_socket(ctx, ep, b"tok-1")
    transport.dealer_send(peer, Heartbeat("tokenizer"))
    assert transport.router_recv(router, TIMEOUT_MS) == (b"tok-1", Heartbeat("tokenizer"))
    transport.router_send(router, b"tok-1", AbortRequest("r1"))
    assert transport.dealer_recv(peer, TIMEOUT_MS) == AbortRequest("r1")
    assert transport.router_recv(router, REFUSED_WAIT_MS) is None  # and still nothing from the others


def test_push_pull_and_pub_sub_with_the_key(ctx, key_file):
    results = endpoint(free_port(), key_file)
    inbox = transport.pull_socket(ctx, results)
    plain = transport.push_socket(ctx, results.connect)
    plain.send(b"\x00not even msgpack")  # no key: never arrives
    worker = transport.push_socket(ctx, results)
    transport.send(worker, Heartbeat("gpu_worker", 1))
    assert transport.recv(inbox, TIMEOUT_MS) == Heartbeat("gpu_worker", 1)
    assert transport.recv(inbox, REFUSED_WAIT_MS) is None

    plans = endpoint(free_port(), key_file)
    pub = transport.pub_socket(ctx, plans)
    sub, plain = transport.sub_socket(ctx, plans), transport.sub_socket(ctx, plans.connect)
    got = None
    for _ in range(200):  # PUB drops messages until a subscription has arrived
        transport.send(pub, Heartbeat("scheduler"))
        if (got := transport.recv(sub, timeout_ms=10)) is not None:
            break
    assert got == Heartbeat("scheduler")
    assert transport.recv(plain, REFUSED_WAIT_MS) is None


def test_asyncio_owner_with_the_key_and_its_context_closes_at_once(key_file):
    """The api's sockets live on an asyncio context; its ZAP handler must not hold up the context's end."""
    ep = endpoint(free_port(), key_file)

    async def main():
        ctx = transport.async_context()
        try:
            router = transport.router_socket(ctx, ep)
            plain = transport.dealer_socket(ctx, ep.connect, b"plain")
            await transport.dealer_send_async(plain, AbortRequest("intruder"))
            peer = transport.dealer_socket(ctx, ep, b"tok-a")
            await transport.dealer_send_async(peer, Heartbeat("tokenizer"))
            first = await asyncio.wait_for(transport.router_recv_async(router), 5)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(transport.router_recv_async(router), REFUSED_WAIT_MS / 1000)
            return first
        finally:
            started = time.monotonic()
            ctx.destroy(linger=0)
            assert time.monotonic() - started < 2

    assert asyncio.run(main()) == (b"tok-a", Heartbeat("tokenizer"))


def test_the_engine_binds_the_configured_interface(ctx, key_file):
    port = free_port()
    default = address_plan(ServerConfig(transport="tcp", port=8000), base_port=port)
    router = transport.router_socket(ctx, default.scheduler)
    assert router.getsockopt(zmq.LAST_ENDPOINT) == f"tcp://127.0.0.1:{port}".encode()
    # Not reachable through another address of this host (only loopback is bound).
    outside = _non_loopback_address()
    if outside is not None:
        with pytest.raises(OSError):
            socket.create_connection((outside, port), timeout=1).close()
    chosen = address_plan(ServerConfig(transport="tcp", port=8000, engine_bind_host="127.0.0.2"), base_port=port)
    other = transport.router_socket(ctx, chosen.scheduler)
    assert other.getsockopt(zmq.LAST_ENDPOINT) == f"tcp://127.0.0.2:{port}".encode()


def _non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent; this only picks the outgoing interface
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_an_unauthenticated_bind_beyond_loopback_warns_loudly(ctx, key_file, caplog):
    with caplog.at_level(logging.WARNING, logger="headrace.transport"):
        transport.router_socket(ctx, Endpoint(f"tcp://127.0.0.1:{free_port()}", "-"))
        transport.router_socket(ctx, Endpoint(f"tcp://0.0.0.0:{free_port()}", "-", key_file))
        assert "INSECURE" not in caplog.text  # loopback, or a key: nothing to say
        port = free_port()
        transport.router_socket(ctx, Endpoint(f"tcp://0.0.0.0:{port}", "-"))
    assert f"INSECURE: engine socket tcp://0.0.0.0:{port} accepts peers from the network" in caplog.text


def test_a_peer_host_that_does_not_resolve_fails_at_once(ctx):
    started = time.monotonic()
    with pytest.raises(ConfigError, match="'no-such-host.invalid'.*does not resolve"):
        transport.dealer_socket(ctx, "tcp://no-such-host.invalid:9000")
    assert time.monotonic() - started < 10


def test_key_files(tmp_path):
    old = os.umask(0)
    try:
        path = str(tmp_path / "k")
        curve.write_new_key_file(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = curve.read_key_file(path)
    assert len(key.secret) == 40 and zmq.curve_public(key.secret) == key.public
    with pytest.raises(ConfigError, match="exists already"):
        curve.write_new_key_file(path)
    assert curve.read_key_file(path) == key  # not replaced
    assert curve.create_key_file_if_missing(path) is False
    assert curve.create_key_file_if_missing(str(tmp_path / "new")) is True
    with pytest.raises(ConfigError, match="No such file"):
        curve.read_key_file(str(tmp_path / "missing"))
    (tmp_path / "junk").write_text("not a key")
    with pytest.raises(ConfigError, match="does not hold a CURVE secret key"):
        curve.read_key_file(str(tmp_path / "junk"))
    (tmp_path / "bad-z85").write_text("~" * 40)
    with pytest.raises(ConfigError, match="does not hold a CURVE secret key"):
        curve.read_key_file(str(tmp_path / "bad-z85"))


def test_zap_reply():
    allowed = b"k" * 32
    ok = curve.zap_reply([b"1.0", b"7", b"headrace", b"10.0.0.5", b"", b"CURVE", allowed], allowed)
    assert ok[:3] == [b"1.0", b"7", b"200"]
    assert curve.zap_reply([b"1.0", b"8", b"headrace", b"10.0.0.5", b"", b"CURVE", b"x" * 32], allowed)[2] == b"400"
    assert curve.zap_reply([b"1.0", b"9", b"headrace", b"10.0.0.5", b"", b"NULL"], allowed)[2] == b"400"
    assert curve.zap_reply([b"1.0"], allowed)[2] == b"500"
