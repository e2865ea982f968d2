"""Which engine replica runs a request (--data-parallel-size D > 1, --dp-routing): the tokenizer's policy.

The tokenizer is where a request's token ids are first known, so it routes. What it knows of each replica:
- health: the replica's EngineStats (its scheduler sends them every 0.5 s to tokenizers as to apis); a replica
  is routable while its last stats said serving and are younger than STALE_S, and not once its scheduler's
  connection closed. When none is routable every replica is a candidate (its scheduler holds the request
  until its workers are ready, as a single engine does).
- load, in tokens of work still queued there. The replica reports it (its waiting requests' prompt tokens +
  its running requests' unprefilled tokens + one per running request) every 0.5 s; this tokenizer knows its
  own requests there now (routed and not finished: their uncached prompt tokens until the first token comes
  back, then one). load = ours now + max(0, reported - ours when the report came): the report stands for
  the other tokenizers' requests, ours are counted fresh, so a burst does not all land on the replica that
  looked idle half a second ago, nor does a finished request keep a replica looking busy.
- its prefix cache: the block hashes its KV events (common/kv_events.py) say it holds, plus the prompt blocks
  of requests just routed there (they are being prefilled; their BlockStored is on its way), forgotten after
  PENDING_S if no event confirms them. Events are hints: one missed (a subscriber joins late, or a queue
  overflows) costs prefix hits, never a wrong answer, since the replica's own block manager decides what
  its cache serves.

Policies:
- cache_aware: score(d) = hit_tokens(d) - LOAD_WEIGHT * max(0, load_tokens(d) - step_tokens), highest wins,
  then the smaller load. hit_tokens are the prompt's leading full blocks replica d holds (the block manager's
  chained hashes, so a hit on block k implies blocks 0..k-1); step_tokens is --max-num-batched-tokens, the
  work a replica takes in one step. With LOAD_WEIGHT 1 both terms are tokens of prefill work: a request
  follows its prefix unless that replica has more than a step queued and the excess outweighs the prefix.
  Load within one step costs no waiting (it all runs in the next step), so it only breaks ties: requests
  without a hit go to the least loaded replica. (vLLM's and llm-d's scorers weigh a prefix-hit fraction
  against queue depth; sglang-router follows the cache until the load imbalance passes a threshold.)
- least_load: the smallest load_tokens.
- round_robin: the next routable replica in turn.
Ties go to the replica least recently chosen, so equal replicas alternate.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from headrace.common.block_hash import prompt_block_hashes
from headrace.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from headrace.common.messages import EngineStats
from headrace.common.transport import PEER_TIMEOUT_S

LOAD_WEIGHT = 1.0
STALE_S = PEER_TIMEOUT_S  # EngineStats older than this: the replica is not routable (as an api's /health)
PENDING_S = 30.0  # how long a routed prompt's blocks count as cached there without a BlockStored


@dataclass
class ReplicaView:
    """What this tokenizer knows of one replica."""

    serving: bool = False
    stats_seen: float = float("-inf")  # monotonic
    connected: bool = True  # False from its scheduler's connection closing until its next EngineStats
    reported_load: int = 0
    ours_at_report: int = 0  # our requests' work when that report came
    blocks: set[bytes] = field(default_factory=set)  # from its KV events
    pending: OrderedDict[bytes, float] = field(default_factory=OrderedDict)  # routed here, not yet confirmed
    local: dict[str, int] = field(default_factory=dict)  # req_id -> tokens of work we routed here
    last_chosen: int = 0  # pick counter when last chosen (ties go to the least recent)

    def routable(self, now: float) -> bool:
        return self.connected and self.serving and now - self.stats_seen <= STALE_S

    def load(self) -> int:
        ours = sum(self.local.values())
        return ours + max(0, self.reported_load - self.ours_at_report)

    def hit_blocks(self, hashes: Sequence[bytes]) -> int:
        for k, h in enumerate(hashes):
            if h not in self.blocks and h not in self.pending:
                return k
        return len(hashes)


class ReplicaRouter:
    def __init__(self, num_replicas: int, policy: str = "cache_aware", block_size: int | None = None,
                 step_tokens: int = 0):
        """block_size: the engine's KV block size when its prefix cache is on (else None: no hashing);
        step_tokens: --max-num-batched-tokens (see cache_aware above)."""
        self.policy = policy
        self.step_tokens = step_tokens
        self.block_size = block_size if policy == "cache_aware" else None
        self.replicas = [ReplicaView() for _ in range(num_replicas)]
        self.where: dict[str, int] = {}  # req_id -> replica, for the requests we routed and hold
        self.picks = 0

    # ------------------------------------------------------------------ routing

    def pick(self, req_id: str, token_ids: Sequence[int], now: float | None = None) -> int:
        """Choose the replica for a new request and count its work there until finished()."""
        if len(self.replicas) == 1:
            self.where[req_id] = 0
            return 0
        now = time.monotonic() if now is None else now
        candidates = [d for d, r in enumerate(self.replicas) if r.routable(now)] or list(range(len(self.replicas)))
        hashes = prompt_block_hashes(token_ids, self.block_size) if self.block_size else []
        hits = {d: self.replicas[d].hit_blocks(hashes) for d in candidates}
        best = max(candidates, key=lambda d: self._score(d, hits[d]))
        self.picks += 1
        chosen = self.replicas[best]
        chosen.last_chosen = self.picks
        chosen.local[req_id] = max(1, len(token_ids) - hits[best] * (self.block_size or 0))
        for h in hashes[hits[best]:]:
            chosen.pending[h] = now
        self._expire_pending(chosen, now)
        self.where[req_id] = best
        return best

    def _score(self, d: int, hit_blocks: int) -> tuple[float, int, int]:
        r = self.replicas[d]
        load, recency = r.load(), -r.last_chosen  # the least recently chosen wins ties
        if self.policy == "round_robin":
            return (0.0, 0, recency)
        if self.policy == "least_load":
            return (-load, 0, recency)
        queued = max(0, load - self.step_tokens)
        return (hit_blocks * (self.block_size or 0) - LOAD_WEIGHT * queued, -load, recency)

    @staticmethod
    def _expire_pending(r: ReplicaView, now: float) -> None:
        while r.pending:
            h, since = next(iter(r.pending.items()))
            if now - since <= PENDING_S:
                return
            del r.pending[h]

    # ------------------------------------------------------------------ what the requests do

    def replica_of(self, req_id: str) -> int | None:
        return self.where.get(req_id)

    def started(self, req_id: str) -> None:
        """Its first token came back: its prefill is done, one token per step remains."""
        d = self.where.get(req_id)
        if d is not None and req_id in self.replicas[d].local:
            self.replicas[d].local[req_id] = 1

    def finished(self, req_id: str) -> None:
        d = self.where.pop(req_id, None)
        if d is not None:
            self.replicas[d].local.pop(req_id, None)

    # ------------------------------------------------------------------ what the replicas say

    def on_stats(self, d: int, stats: EngineStats, now: float | None = None) -> None:
        r = self.replicas[d]
        r.serving, r.connected = stats.serving, True
        r.stats_seen = time.monotonic() if now is None else now
        r.reported_load = stats.num_waiting_tokens + stats.num_running_tokens
        r.ours_at_report = sum(r.local.values())

    def on_events(self, d: int, batch: KVEventBatch) -> None:
        r = self.replicas[d]
        for event in batch.events:
            if isinstance(event, BlockStored):
                r.blocks.update(event.block_hashes)
                for h in event.block_hashes:
                    r.pending.pop(h, None)
            elif isinstance(event, BlockRemoved):
                r.blocks.difference_update(event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                r.blocks.clear()
                r.pending.clear()

    def on_replica_lost(self, d: int) -> list[str]:
        """Its scheduler's connection closed: not routable, its cache gone; the ids of our requests it held."""
        r = self.replicas[d]
        r.connected, r.serving = False, False
        r.blocks.clear()
        r.pending.clear()
        lost = list(r.local)
        for req_id in lost:
            self.finished(req_id)
        return lost
