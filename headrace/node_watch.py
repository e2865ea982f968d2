"""A headless node's watch on node 0: its launcher stops the node once node 0's scheduler goes away.

The headless ranks' process group and per-request state belong to node 0's scheduler and ranks; when node 0
stops (or restarts them), these ranks could only wait for transfers that never come. So the node stops, and
whatever supervises it (systemd, a Kubernetes pod) starts it again to join the next world. The watch is a
DEALER connected to the scheduler's socket that sends nothing: ZeroMQ's monitor reports its connection
closing the moment the scheduler process ends (kill -9 included), over tcp to another host as on loopback.
"""

from __future__ import annotations

import zmq

from headrace.common import transport
from headrace.common.addresses import address_plan
from headrace.common.config import ServerConfig


class SchedulerWatch:
    def __init__(self, server: ServerConfig) -> None:
        self.ctx = zmq.Context()
        self.sock = transport.dealer_socket(self.ctx, address_plan(server).scheduler, prefix="node-watch",
                                             monitored=True)  # a scheduler already up is seen connecting
        self.monitor = transport.monitor_socket(self.sock)
        self.connected = False

    def lost(self) -> bool:
        """Whether the scheduler was reached and has gone since (before it was first reached: False)."""
        for event in transport.drain_monitor(self.monitor):
            if event == zmq.EVENT_CONNECTED:
                self.connected = True
            elif event == zmq.EVENT_DISCONNECTED and self.connected:
                return True
        return False

    def close(self) -> None:
        self.sock.disable_monitor()
        self.ctx.destroy(linger=0)
