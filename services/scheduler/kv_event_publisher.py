"""One replica's KV-event publisher, as vLLM's ZmqEventPublisher behaves on the wire (common/kv_events.py):

- `kv-events` PUB: each batch as [topic, seq (8 bytes, big-endian), payload], seq counting from 0.
- `kv-replay` ROUTER: a subscriber that saw a gap in seq sends the first seq it missed (8 bytes, big-endian;
  from a REQ or a DEALER); it gets back every batch still buffered from there on, each as [seq, payload], then
  the end marker [-1 as 8 signed bytes, b""]. The last REPLAY_BUFFER batches are kept.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import zmq

from headrace.common import transport
from headrace.common.addresses import ReplicaEndpoints
from headrace.common.kv_events import KVCacheEvent, KVEventBatch, batch_frames

log = logging.getLogger("headrace.scheduler")

REPLAY_BUFFER = 10_000
END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)


class KVEventPublisher:
    def __init__(self, ctx: zmq.Context, endpoints: ReplicaEndpoints, replica: int, topic: bytes = b""):
        assert endpoints.kv_events is not None and endpoints.kv_replay is not None
        self.pub = transport.pub_socket(ctx, endpoints.kv_events)
        self.replay = transport.router_socket(ctx, endpoints.kv_replay)
        self.replica, self.topic = replica, topic
        self.seq = 0
        self.sent: deque[tuple[int, bytes]] = deque(maxlen=REPLAY_BUFFER)

    def publish(self, events: list[KVCacheEvent]) -> None:
        if not events:
            return
        frames = batch_frames(self.topic, self.seq, KVEventBatch(time.time(), events, self.replica))
        self.pub.send_multipart(frames)
        self.sent.append((self.seq, frames[2]))
        self.seq += 1

    def serve_replay(self) -> None:
        """Answer every replay request waiting on the ROUTER."""
        while True:
            try:
                frames = self.replay.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, envelope, start = frames[0], frames[1:-1], frames[-1]  # a REQ adds an empty delimiter
            if len(start) != 8 or len(frames) > 3:
                log.warning("dropped a malformed KV-event replay request (%d frames)", len(frames))
                continue
            first = int.from_bytes(start, "big")
            for seq, payload in self.sent:
                if seq >= first:
                    self.replay.send_multipart([identity, *envelope, seq.to_bytes(8, "big"), payload])
            self.replay.send_multipart([identity, *envelope, END_OF_REPLAY, b""])
