"""Ports picked for later binds lie below the kernel's ephemeral range, with every asked-for offset free."""

from __future__ import annotations

import socket

from headrace.common.ports import LOWEST, bindable, ephemeral_range, free_port_base


def test_a_picked_base_is_below_the_ephemeral_range_with_its_offsets_free():
    low, high = ephemeral_range()
    assert 0 < low <= high
    for _ in range(20):
        base = free_port_base((0, 5, 1000))
        assert LOWEST <= base and base + 1000 < low
        assert all(bindable(base + o) for o in (0, 5, 1000))


def test_a_held_port_is_not_bindable():
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port_base()))
        held.listen()
        assert not bindable(held.getsockname()[1])
