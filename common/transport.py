"""ZeroMQ sockets with the engine's options, and send/recv of codec messages (sync and asyncio).

Inboxes (PULL) and PUB channels are bound by their owner; PUSH and SUB sockets connect (see
common.addresses). Every factory works with a `zmq.Context` or a `zmq.asyncio.Context`; the socket
follows the context, so the api uses the same helpers with `await`.
"""

from __future__ import annotations

import os
from typing import Any

import zmq
import zmq.asyncio

from common import codec
from common.addresses import Endpoint

# 0 = unbounded queues. Backpressure belongs to the scheduler's waiting queue: a send that blocks on a
# full queue inside a single-threaded loop can deadlock two processes that feed each other.
DEFAULT_HWM = 0


def make_socket(ctx: zmq.Context, kind: int, address: Endpoint | str, *, bind: bool,
                hwm: int = DEFAULT_HWM, linger_ms: int = 0) -> zmq.Socket:
    sock = ctx.socket(kind)
    # linger 0: a process that exits never hangs on messages its dead peer will not take.
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if isinstance(address, Endpoint):
        address = address.bind if bind else address.connect
    if bind:
        if address.startswith("ipc://"):
            os.makedirs(os.path.dirname(address[len("ipc://"):]) or ".", exist_ok=True)
        sock.bind(address)
    else:
        sock.connect(address)
    return sock


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


# --------------------------------------------------------------------------- sync


def send(sock: zmq.Socket, msg: Any) -> None:
    sock.send(codec.encode(msg), copy=False)


def recv(sock: zmq.Socket, timeout_ms: int | None = None) -> Any | None:
    """The next message, or None when `timeout_ms` passes first. Malformed bytes raise MessageDecodeError
    (the bad frame is consumed, so the caller can log it and keep receiving)."""
    if timeout_ms is not None and not sock.poll(timeout_ms, zmq.POLLIN):
        return None
    return codec.decode(sock.recv())


def recv_nowait(sock: zmq.Socket) -> Any | None:
    try:
        data = sock.recv(zmq.NOBLOCK)
    except zmq.Again:
        return None
    return codec.decode(data)


# --------------------------------------------------------------------------- asyncio


def async_context() -> zmq.asyncio.Context:
    return zmq.asyncio.Context()


async def send_async(sock: zmq.asyncio.Socket, msg: Any) -> None:
    await sock.send(codec.encode(msg), copy=False)


async def recv_async(sock: zmq.asyncio.Socket) -> Any:
    return codec.decode(await sock.recv())
