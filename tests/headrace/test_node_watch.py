"""A headless node's watch on node 0's scheduler (headrace/node_watch.py), over real ipc sockets."""

from __future__ import annotations

import time

import pytest
import zmq

from headrace.common import transport
from headrace.common.addresses import address_plan
from headrace.common.config import ServerConfig
from headrace.node_watch import SchedulerWatch


def lost_within(watch: SchedulerWatch, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if watch.lost():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def slow_monitor(monkeypatch):
    """Attaching a monitor takes 0.2 s, as it may when a loaded machine preempts the thread (CI's two cores):
    a watch that connected before listening would miss the first connection, and then its end."""
    attach = transport.monitor_socket

    def slowly(sock):
        time.sleep(0.2)
        return attach(sock)

    monkeypatch.setattr(transport, "monitor_socket", slowly)


@pytest.mark.parametrize("scheduler_first", [True, False], ids=["scheduler-up-first", "watch-up-first"])
def test_the_watch_reports_the_scheduler_gone_once_it_was_reached(tmp_path, slow_monitor, scheduler_first):
    server = ServerConfig(ipc_dir=str(tmp_path))
    address = address_plan(server).scheduler
    ctx = zmq.Context()
    scheduler = transport.router_socket(ctx, address, bind=True) if scheduler_first else None
    watch = SchedulerWatch(server)
    try:
        if scheduler is None:
            assert not lost_within(watch, 0.3)  # not reached yet is no loss
            scheduler = transport.router_socket(ctx, address, bind=True)
        time.sleep(0.5)  # ZeroMQ reconnects every 100 ms
        assert not watch.lost()
        scheduler.close(linger=0)
        assert lost_within(watch, 5.0), "the scheduler's exit went unnoticed"
    finally:
        watch.close()
        ctx.destroy(linger=0)
