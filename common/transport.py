"""ZeroMQ sockets with the engine's options, and send/recv of codec messages (sync and asyncio).

ROUTER sockets are bound by their owner (the scheduler, each api); peers connect DEALERs to them, each with
a ZeroMQ identity that names the peer on the ROUTER (see common.addresses). A ROUTER learns a peer's
identity from the peer's first message, so every DEALER says hello with a `Heartbeat` right after it
connects. PULL and PUB (the worker channels) are bound by the scheduler; PUSH and SUB connect.

Every factory works with a `zmq.Context` or a `zmq.asyncio.Context`; the socket follows the context, so the
api uses the same factories and the `*_async` send/recv with `await`.

Over tcp, every socket built here is secured here: with the engine's CURVE key (the endpoint carries its file)
the owner that binds is a CURVE server admitting only peers that hold the key and its peers are CURVE clients
(common/curve.py says why one key); without a key, a bind beyond loopback logs a loud warning. A peer host
that does not resolve is a ConfigError at once, not a silent retry.

Receivers: malformed bytes (not a message, or the wrong number of frames) raise `MessageDecodeError` after
the whole bad message has been consumed, so a loop that catches it and logs carries on with the next one.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

import zmq
import zmq.asyncio

from headrace.common import codec, curve
from headrace.common.addresses import Endpoint, check_resolves, is_loopback
from headrace.common.codec import MessageDecodeError
from headrace.common.config import ConfigError
from headrace.common.ipc_dir import bind_path_is_free, private_dir

# --------------------------------------------------------------------------- liveness timing (every process)

# Every peer that connects a DEALER sends a Heartbeat on every socket this often.
HEARTBEAT_INTERVAL_S = 1.0
# A peer not heard from for this long is dead: its pending requests fail (api) or are aborted (scheduler).
PEER_TIMEOUT_S = 3.0
# The scheduler sends EngineStats to every api this often; the api's /health is its arrival.
ENGINE_STATS_INTERVAL_S = 0.5
# A worker rank not heard from for this long is dead (under compose no launcher watches its pid); longer than
# PEER_TIMEOUT_S because a rank's heartbeat thread can wait behind a long kernel launch or compile.
WORKER_TIMEOUT_S = 10.0

# 0 = unbounded queues. Backpressure belongs to the scheduler's waiting queue: a send that blocks on a
# full queue inside a single-threaded loop can deadlock two processes that feed each other.
DEFAULT_HWM = 0

Identity = bytes

log = logging.getLogger("headrace.transport")


def make_socket(ctx: zmq.Context, kind: int, address: Endpoint | str, *, bind: bool,
                hwm: int = DEFAULT_HWM, linger_ms: int = 0, identity: Identity | None = None,
                monitored: bool = False) -> zmq.Socket:
    """`monitored`: attach the connection monitor (read it with `monitor_socket`) before connecting, so that
    it sees the first connection too; one attached after connect() misses it when the peer is already up."""
    key_file = address.curve_key_file if isinstance(address, Endpoint) else None
    if isinstance(address, Endpoint):
        address = address.bind if bind else address.connect
    sock = ctx.socket(kind)
    try:
        # linger 0: a process that exits never hangs on messages its dead peer will not take.
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        if identity is not None:
            sock.setsockopt(zmq.ROUTING_ID, _valid_identity(identity))  # before connect: peers read it on handshake
        if address.startswith("tcp://"):
            _secure_tcp(ctx, sock, address, bind=bind, key_file=key_file)  # before bind/connect: the handshake reads it
        if monitored:
            monitor_socket(sock)
        _attach(sock, address, bind=bind)
    except BaseException:
        sock.close(linger=0)  # a half-made socket would hold up the context's termination
        raise
    return sock


def _attach(sock: zmq.Socket, address: str, *, bind: bool) -> None:
    if bind and address.startswith("ipc://"):
        _bind_ipc(sock, address[len("ipc://"):])
    elif bind:
        try:
            sock.bind(address)
        except zmq.ZMQError as e:  # a bare "Address already in use" names neither the port nor its way out
            raise ConfigError(f"cannot bind {address}: {e.strerror}. Another process holds the port; over tcp "
                              "the engine binds --port + 1000 and the ports after it (pick another --port)") from e
    else:
        if address.startswith("tcp://"):
            check_resolves(address)
        sock.connect(address)


def _secure_tcp(ctx: zmq.Context, sock: zmq.Socket, address: str, *, bind: bool, key_file: str | None) -> None:
    """CURVE with the engine's key: the owner (binding side) is the server and admits only peers holding the
    key; a peer is a client with the same key pair."""
    if address.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)
    if key_file is None:
        if bind and not is_loopback(address):
            log.warning("INSECURE: engine socket %s accepts peers from the network with no authentication: "
                        "anyone who reaches it can submit requests or shut the engine down. Set "
                        "--engine-curve-key-file (docs/deployment.md, Security).", address)
        return
    key = curve.read_key_file(key_file)
    if bind:
        curve.ensure_authenticator(ctx, key)  # before the bind: the first peer already meets it
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, key.secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, curve.ZAP_DOMAIN)
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # and should the handler be gone, refuse rather than admit
    else:
        sock.setsockopt(zmq.CURVE_SERVERKEY, key.public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, key.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, key.secret)


def _bind_ipc(sock: zmq.Socket, path: str) -> None:
    """Bind a socket file that only this user can reach, in a folder only this user can enter
    (common.ipc_dir says why the folder is the guarantee)."""
    private_dir(os.path.dirname(path) or ".")
    bind_path_is_free(path)
    # The file is made with 0777 & ~umask. The umask is process-wide: a file another thread creates in this
    # instant comes out owner-only too, which is never less safe than it asked for.
    old = os.umask(0o077)
    try:
        sock.bind(f"ipc://{path}")
    finally:
        os.umask(old)


def new_identity(prefix: str) -> Identity:
    """A fresh identity for one process start (b"tok-3f9c0a1b2c4d"): a restarted peer is a new peer."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}".encode()


def _valid_identity(identity: Identity) -> Identity:
    # ZeroMQ reserves identities starting with a zero byte for the ones it makes up itself.
    if not isinstance(identity, bytes) or not 0 < len(identity) <= 255 or identity[0] == 0:
        raise ValueError(f"a ZeroMQ identity is 1..255 bytes not starting with a zero byte, got {identity!r}")
    return identity


def router_socket(ctx: zmq.Context, address: Endpoint | str, *, bind: bool = True) -> zmq.Socket:
    sock = make_socket(ctx, zmq.ROUTER, address, bind=bind)
    # Sending to a peer that has gone is a silent drop, not an error: the sender's loop must not die of it,
    # and liveness (heartbeats) is what notices the peer is gone.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    # A peer that reconnects with an identity still held by its stale connection takes it over.
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    return sock


def dealer_socket(ctx: zmq.Context, address: Endpoint | str, identity: Identity | None = None, *,
                  prefix: str = "peer", bind: bool = False, linger_ms: int = 0, monitored: bool = False) -> zmq.Socket:
    """A DEALER named `identity` (or a fresh `new_identity(prefix)`); read it back with `identity_of`.
    `linger_ms` > 0 for a one-shot sender that closes right after sending (the launcher's notices)."""
    if identity is None:
        identity = new_identity(prefix)
    return make_socket(ctx, zmq.DEALER, address, bind=bind, identity=identity, linger_ms=linger_ms,
                       monitored=monitored)


def identity_of(sock: zmq.Socket) -> Identity:
    return sock.getsockopt(zmq.ROUTING_ID)


def push_socket(ctx: zmq.Context, address: Endpoint | str, *, bind: bool = False) -> zmq.Socket:
    return make_socket(ctx, zmq.PUSH, address, bind=bind)


def pull_socket(ctx: zmq.Context, address: Endpoint | str, *, bind: bool = True) -> zmq.Socket:
    return make_socket(ctx, zmq.PULL, address, bind=bind)


def pub_socket(ctx: zmq.Context, address: Endpoint | str, *, bind: bool = True) -> zmq.Socket:
    return make_socket(ctx, zmq.PUB, address, bind=bind)


def sub_socket(ctx: zmq.Context, address: Endpoint | str, *, bind: bool = False) -> zmq.Socket:
    sock = make_socket(ctx, zmq.SUB, address, bind=bind)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    return sock


# --------------------------------------------------------------------------- frames -> messages


def _one(frames: list[bytes]) -> Any:
    if len(frames) != 1:
        raise MessageDecodeError(f"expected 1 frame, got {len(frames)}")
    return codec.decode(frames[0])


def _routed(frames: list[bytes]) -> tuple[Identity, Any]:
    if len(frames) != 2:
        raise MessageDecodeError(f"expected [identity, message] frames, got {len(frames)} frames")
    identity, data = frames
    try:
        return identity, codec.decode(data)
    except MessageDecodeError as e:
        raise MessageDecodeError(f"from {identity!r}: {e}") from None


def _recv_frames(sock: zmq.Socket, timeout_ms: int | None) -> list[bytes] | None:
    """All frames of the next message, or None when `timeout_ms` passes first (0: only what is queued)."""
    if timeout_ms == 0:
        try:
            return sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
    if timeout_ms is not None and not sock.poll(timeout_ms, zmq.POLLIN):
        return None
    return sock.recv_multipart()


# --------------------------------------------------------------------------- sync


def send(sock: zmq.Socket, msg: Any) -> None:
    """One message on a PUSH, PUB or DEALER socket."""
    sock.send(codec.encode(msg), copy=False)


def recv(sock: zmq.Socket, timeout_ms: int | None = None) -> Any | None:
    """The next message on a PULL, SUB or DEALER socket, or None when `timeout_ms` passes first."""
    frames = _recv_frames(sock, timeout_ms)
    return None if frames is None else _one(frames)


def recv_nowait(sock: zmq.Socket) -> Any | None:
    return recv(sock, 0)


def router_send(sock: zmq.Socket, identity: Identity, msg: Any) -> None:
    """One message to the peer named `identity`; dropped silently if that peer is not connected."""
    sock.send_multipart([identity, codec.encode(msg)], copy=False)


def router_recv(sock: zmq.Socket, timeout_ms: int | None = None) -> tuple[Identity, Any] | None:
    """(sender identity, message) from a ROUTER, or None when `timeout_ms` passes first (0: no wait)."""
    frames = _recv_frames(sock, timeout_ms)
    return None if frames is None else _routed(frames)


# DEALER traffic is one frame each way, as on PUSH/PULL; the names say which side of a ROUTER a caller is on.
dealer_send = send
dealer_recv = recv


# --------------------------------------------------------------------------- asyncio


def async_context() -> zmq.asyncio.Context:
    return zmq.asyncio.Context()


async def send_async(sock: zmq.asyncio.Socket, msg: Any) -> None:
    await sock.send(codec.encode(msg), copy=False)


async def recv_async(sock: zmq.asyncio.Socket) -> Any:
    return _one(await sock.recv_multipart())


async def router_send_async(sock: zmq.asyncio.Socket, identity: Identity, msg: Any) -> None:
    await sock.send_multipart([identity, codec.encode(msg)], copy=False)


async def router_recv_async(sock: zmq.asyncio.Socket) -> tuple[Identity, Any]:
    return _routed(await sock.recv_multipart())


dealer_send_async = send_async
dealer_recv_async = recv_async


# --------------------------------------------------------------------------- connection monitors

# A peer process that dies (kill -9 included) closes its connections; the kernel tells the other end at once,
# and ZeroMQ reports it as EVENT_DISCONNECTED on a monitor socket. Heartbeats still catch a peer that hangs;
# monitors make a crash visible in milliseconds instead of PEER_TIMEOUT_S.
MONITOR_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED


def monitor_socket(sock: zmq.Socket) -> zmq.Socket:
    """A PAIR socket that receives `sock`'s connect/accept/disconnect events (read with `monitor_events`).
    It follows sock's context, so an asyncio socket gets an asyncio monitor. pyzmq keeps it: a second call
    returns the same one."""
    return sock.get_monitor_socket(MONITOR_EVENTS)


def monitor_events(frames: list[bytes]) -> int:
    """The event of one monitor message (zmq.EVENT_*), from its two frames."""
    from zmq.utils.monitor import parse_monitor_message

    return int(parse_monitor_message(frames)["event"])


def drain_monitor(mon: zmq.Socket) -> list[int]:
    """Every event waiting on a (synchronous) monitor socket, oldest first."""
    events = []
    while True:
        try:
            frames = mon.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return events
        events.append(monitor_events(frames))
