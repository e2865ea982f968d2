"""The socket helpers over real ipc:// sockets in a temp dir: ROUTER/DEALER, PUSH/PULL, PUB/SUB, asyncio."""

from __future__ import annotations

import asyncio

import pytest
import zmq

from headrace.common import codec, transport
from headrace.common.addresses import address_plan
from headrace.common.codec import MessageDecodeError
from headrace.common.config import ServerConfig
from headrace.common.messages import AbortRequest, EngineStats, Heartbeat, TokenizedRequest
from headrace.common.sampling_params import SamplingParams

TIMEOUT_MS = 5000


@pytest.fixture
def plan(tmp_path):
    return address_plan(ServerConfig(ipc_dir=str(tmp_path)))


@pytest.fixture
def ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def routed(router) -> tuple[bytes, object]:
    got = transport.router_recv(router, TIMEOUT_MS)
    assert got is not None, "nothing reached the router"
    return got


def test_router_dealer_round_trip_by_identity(plan, ctx):
    router = transport.router_socket(ctx, plan.scheduler)
    api = transport.dealer_socket(ctx, plan.scheduler, b"api-0")
    tok = transport.dealer_socket(ctx, plan.scheduler, prefix="tok")
    assert transport.identity_of(api) == b"api-0" and transport.identity_of(tok).startswith(b"tok-")
    assert router.getsockopt(zmq.LINGER) == 0 and tok.getsockopt(zmq.LINGER) == 0

    transport.dealer_send(api, Heartbeat("api", 0))
    transport.dealer_send(tok, Heartbeat("tokenizer", 3))
    hellos = dict(routed(router) for _ in range(2))
    assert hellos == {b"api-0": Heartbeat("api", 0), transport.identity_of(tok): Heartbeat("tokenizer", 3)}

    # Each reply reaches only the peer it names.
    request = TokenizedRequest("r1", list(range(1000)), SamplingParams(stop=("x",)))
    transport.router_send(router, transport.identity_of(tok), request)
    transport.router_send(router, b"api-0", EngineStats(num_running=2))
    assert transport.dealer_recv(tok, TIMEOUT_MS) == request
    assert transport.dealer_recv(api, TIMEOUT_MS) == EngineStats(num_running=2)
    assert transport.dealer_recv(tok, 0) is None and transport.dealer_recv(api, 10) is None
    assert transport.router_recv(router, 0) is None and transport.router_recv(router, 10) is None


def test_send_to_a_vanished_peer_is_dropped_and_a_restarted_peer_is_reached(plan, ctx):
    router = transport.router_socket(ctx, plan.api_inbox[0])
    transport.router_send(router, b"tok-never-connected", AbortRequest("r1"))  # no error: a silent drop
    old = transport.dealer_socket(ctx, plan.api_inbox[0], b"tok-1")
    transport.dealer_send(old, Heartbeat("tokenizer"))
    assert routed(router) == (b"tok-1", Heartbeat("tokenizer"))
    old.close(linger=0)
    transport.router_send(router, b"tok-1", AbortRequest("lost"))  # may go to the dead connection or nowhere

    new = transport.dealer_socket(ctx, plan.api_inbox[0], b"tok-1")
    transport.dealer_send(new, Heartbeat("tokenizer", 1))
    assert routed(router) == (b"tok-1", Heartbeat("tokenizer", 1))
    transport.router_send(router, b"tok-1", AbortRequest("r2"))
    assert transport.dealer_recv(new, TIMEOUT_MS) == AbortRequest("r2")


def test_a_dealer_may_connect_and_say_hello_before_the_router_binds(plan, ctx):
    dealer = transport.dealer_socket(ctx, plan.scheduler, b"early")
    transport.dealer_send(dealer, Heartbeat("tokenizer"))  # queued until the connection is up
    router = transport.router_socket(ctx, plan.scheduler)
    assert routed(router) == (b"early", Heartbeat("tokenizer"))


def test_router_survives_malformed_payloads_and_frame_counts(plan, ctx):
    router = transport.router_socket(ctx, plan.scheduler)
    dealer = transport.dealer_socket(ctx, plan.scheduler, b"tok-x")
    dealer.send(b"\x00not msgpack")
    dealer.send_multipart([b"two", b"frames"])
    dealer.send(b"")
    transport.dealer_send(dealer, AbortRequest("ok"))
    with pytest.raises(MessageDecodeError, match="tok-x"):
        transport.router_recv(router, TIMEOUT_MS)
    with pytest.raises(MessageDecodeError, match="3 frames"):
        transport.router_recv(router, TIMEOUT_MS)
    with pytest.raises(MessageDecodeError):
        transport.router_recv(router, TIMEOUT_MS)
    # Each bad message was consumed whole; the next good one follows.
    assert routed(router) == (b"tok-x", AbortRequest("ok"))


def test_dealer_survives_malformed_payloads_and_frame_counts(plan, ctx):
    router = transport.router_socket(ctx, plan.scheduler)
    dealer = transport.dealer_socket(ctx, plan.scheduler, b"tok-y")
    transport.dealer_send(dealer, Heartbeat("tokenizer"))
    routed(router)
    router.send_multipart([b"tok-y", b"\xc1"])
    router.send_multipart([b"tok-y", codec.encode(AbortRequest("a")), b"extra"])
    transport.router_send(router, b"tok-y", AbortRequest("b"))
    for _ in range(2):
        with pytest.raises(MessageDecodeError):
            transport.dealer_recv(dealer, TIMEOUT_MS)
    assert transport.dealer_recv(dealer, TIMEOUT_MS) == AbortRequest("b")


def test_identities(plan, ctx):
    assert transport.new_identity("tok") != transport.new_identity("tok")
    assert len(transport.new_identity("tok")) == len(b"tok-") + 12
    for bad in (b"", b"\x00zero-first", b"x" * 256, "text"):
        with pytest.raises(ValueError, match="identity"):
            transport.dealer_socket(ctx, plan.scheduler, bad)


def test_push_pull_round_trip_survives_malformed_bytes(plan, ctx):
    inbox = transport.pull_socket(ctx, plan.worker_result)
    sender = transport.push_socket(ctx, plan.worker_result)
    assert inbox.getsockopt(zmq.LINGER) == 0
    sender.send(b"\x00not msgpack")
    transport.send(sender, Heartbeat("gpu_worker", 1))
    with pytest.raises(MessageDecodeError):
        transport.recv(inbox, timeout_ms=TIMEOUT_MS)
    assert transport.recv(inbox, timeout_ms=TIMEOUT_MS) == Heartbeat("gpu_worker", 1)
    assert transport.recv(inbox, timeout_ms=10) is None
    assert transport.recv_nowait(inbox) is None


def test_pub_sub_reaches_every_subscriber(plan, ctx):
    pub = transport.pub_socket(ctx, plan.worker_plan)
    subs = [transport.sub_socket(ctx, plan.worker_plan) for _ in range(2)]
    # PUB drops messages until a subscription has propagated: publish until both have one.
    got = [None, None]
    for _ in range(200):
        transport.send(pub, Heartbeat("scheduler"))
        got = [g or transport.recv(s, timeout_ms=10) for g, s in zip(got, subs)]
        if all(got):
            break
    assert got == [Heartbeat("scheduler"), Heartbeat("scheduler")]


def test_asyncio_router_dealer(plan):
    async def main():
        ctx = transport.async_context()
        try:
            router = transport.router_socket(ctx, plan.api_inbox[0])
            dealer = transport.dealer_socket(ctx, plan.api_inbox[0], b"tok-a")
            await transport.dealer_send_async(dealer, Heartbeat("tokenizer"))
            hello = await asyncio.wait_for(transport.router_recv_async(router), 5)
            dealer.send(b"junk")  # the api's reader task must survive it
            await transport.dealer_send_async(dealer, AbortRequest("r9"))
            with pytest.raises(MessageDecodeError):
                await asyncio.wait_for(transport.router_recv_async(router), 5)
            after_junk = await asyncio.wait_for(transport.router_recv_async(router), 5)
            await transport.router_send_async(router, b"tok-a", AbortRequest("r7"))
            reply = await asyncio.wait_for(transport.dealer_recv_async(dealer), 5)
            return hello, after_junk, reply
        finally:
            ctx.destroy(linger=0)

    assert asyncio.run(main()) == ((b"tok-a", Heartbeat("tokenizer")), (b"tok-a", AbortRequest("r9")),
                                   AbortRequest("r7"))


def test_asyncio_push_pull(plan):
    async def main():
        ctx = transport.async_context()
        try:
            inbox = transport.pull_socket(ctx, plan.worker_result)
            sender = transport.push_socket(ctx, plan.worker_result)
            await transport.send_async(sender, AbortRequest("r7"))
            return await asyncio.wait_for(transport.recv_async(inbox), 5)
        finally:
            ctx.destroy(linger=0)

    assert asyncio.run(main()) == AbortRequest("r7")


def test_a_tcp_port_held_by_another_process_is_named_on_bind(ctx):
    import socket

    from headrace.common.addresses import Endpoint
    from headrace.common.config import ConfigError
    from tests.headrace.server_process import free_port

    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with pytest.raises(ConfigError, match=f"cannot bind tcp://127.0.0.1:{port}: Address already in use"):
            transport.pull_socket(ctx, Endpoint(f"tcp://127.0.0.1:{port}", "-"))
