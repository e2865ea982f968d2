"""Picking free TCP ports on this host for ports the engine binds later (a rendezvous, a test server's block).

A port the kernel hands out for bind(0) lies in its ephemeral range, where any outgoing connection on the
machine (the engine's own ZeroMQ dials included) may take it as a source port between the pick and the
bind: a start then fails at random with "Address already in use". The ports picked here lie below that range.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Sequence

LOWEST = 10000  # above the well-known and registered ports most services sit on


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for source ports (Linux's default when it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def bind_error(port: int, host: str = "127.0.0.1", reuse_addr: bool = False) -> OSError | None:
    """Why a TCP socket cannot bind (host, port) now, or None when it can. `reuse_addr`: probe as ZeroMQ
    binds (SO_REUSEADDR), so a closed connection still in TIME_WAIT does not count as taken. Host "" or
    "0.0.0.0": every IPv4 interface; an IPv6 literal is probed over IPv6."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse_addr:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e
    return None


def bindable(port: int, host: str = "127.0.0.1") -> bool:
    return bind_error(port, host) is None


def free_port_base(offsets: Sequence[int] = (0,), attempts: int = 200) -> int:
    """A port p below the ephemeral range such that p + o is free for every o in `offsets` (checked now; a
    port free now may still be taken by a deliberate bind of another program before it is used)."""
    top = ephemeral_range()[0] - max(offsets)
    if top <= LOWEST:
        raise RuntimeError(f"no room below the ephemeral port range (it starts at {ephemeral_range()[0]})")
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(LOWEST, top)
        if all(bindable(base + o) for o in offsets):
            return base
    raise RuntimeError(f"no free ports at offsets {list(offsets)[:4]}... below {top} after {attempts} tries")
