"""The scheduler process: the continuous-batching loop between the tokenizers and the gpu_worker ranks.

It binds the `scheduler` ROUTER (tokenizers, apis, the launcher), the `worker-plan` PUB and the
`worker-result` PULL. Each step: take new requests and aborts, plan (services/scheduler/scheduler.py),
publish the plan to every rank, wait for rank 0's result while still taking requests, then route the
new tokens to the tokenizer that owns each request. Engine gauges go to every api every 0.5 s (and, with
several replicas, to every tokenizer, which routes between replicas by them). With --data-parallel-size D there is one
scheduler per replica (`index` is the replica), each with its own sockets, ranks and block pool; it also binds
a `kv-events` PUB where its block manager's prefix-cache events go out in vLLM's schema (common/kv_events.py).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from headrace.common import transport
from headrace.common.addresses import AddressPlan, plan_for
from headrace.common.codec import MessageDecodeError
from headrace.common.config import EngineConfig
from headrace.common.kv_events import AllBlocksCleared, KVCacheEvent
from headrace.common.messages import (
    AbortRequest,
    BatchRequestOutput,
    EngineStats,
    Heartbeat,
    RequestOutput,
    RequestTimings,
    Shutdown,
    StepPlan,
    StepResult,
    TokenizedRequest,
    WorkerError,
    WorkerFailed,
    WorkerReady,
)
from headrace.common.process import freeze_startup_heap
from headrace.services.scheduler.kv_event_publisher import KVEventPublisher
from headrace.services.scheduler.request import Request
from headrace.services.scheduler.scheduler import Scheduler

log = logging.getLogger("headrace.scheduler")

# A request accepted while the engine cannot run (workers loading or restarting) waits this long for it.
HOLD_TIMEOUT_S = 120.0
# What every request that was running when a worker died is told, after the reason.
KV_LOST = "; the request's KV cache state was lost with it. Retry the request."


@dataclass
class PeerState:
    last_seen: float
    req_ids: set[str] = field(default_factory=set)


class SchedulerService:
    def __init__(self, config: EngineConfig, plan: AddressPlan, replica: int = 0):
        """plan: the whole engine's (plan_for); this scheduler binds replica `replica`'s sockets."""
        self.config = config
        self.model = config.require_resolved()
        self.world_size = config.parallel.world_size  # ranks that must be ready: every stage's TP ranks
        self.pp_size = config.parallel.pipeline_parallel_size
        self.replica = replica
        self.ctx = zmq.Context()
        if plan.replicas:
            plan = plan.replica(replica)
        self.frontend = transport.router_socket(self.ctx, plan.scheduler)
        own = plan.replicas[replica] if plan.replicas else None
        self.kv_events = KVEventPublisher(self.ctx, own, replica) if own and own.kv_events else None
        self.routed = len(plan.replicas) > 1  # the tokenizers choose between replicas: they want our stats too
        self.plan_pub = transport.pub_socket(self.ctx, plan.worker_plan)
        self.results = transport.pull_socket(self.ctx, plan.worker_result)
        self.poller = zmq.Poller()
        self.poller.register(self.frontend, zmq.POLLIN)
        self.poller.register(self.results, zmq.POLLIN)
        if self.kv_events is not None:
            self.poller.register(self.kv_events.replay, zmq.POLLIN)

        self.scheduler: Scheduler | None = None  # exists once every rank is ready
        self.ready: dict[int, WorkerReady] = {}
        self.worker_seen: dict[int, float] = {}
        self.tokenizers: dict[bytes, PeerState] = {}
        self.apis: dict[bytes, float] = {}
        self.owner: dict[str, tuple[bytes, Request]] = {}  # req_id -> (tokenizer identity, request)
        # Requests accepted while there is no engine to run them (loading, or ranks restarting after a failure),
        # with when each arrived (monotonic): queued in order once every rank is ready, so a restart loses none.
        self.held: dict[str, float] = {}
        # Plans sent and not yet answered, oldest first: with async scheduling step t+1 is planned and sent
        # while step t runs, so the worker starts it without waiting for a round trip through here.
        self.inflight: deque[StepPlan] = deque()
        # With P pipeline stages, P steps of disjoint requests keep every stage busy (micro-batches).
        self.max_inflight = self.pp_size if self.pp_size > 1 else 2 if config.scheduler.async_scheduling else 1
        # Set when planning found nothing to run (e.g. every running request waits on a token in flight):
        # no new plan until some message arrives, instead of spinning.
        self.stalled = False
        self.seeds = random.Random(config.model.seed)
        self.last_stats = 0.0
        self.running = True

    # ------------------------------------------------------------------ main loop

    def run(self, parent_pid: int | None = None) -> None:
        while self.running:
            if self._can_step():
                self._start_step()
                self._publish_kv_events()
            timeout = 0 if self._can_step() else 50
            events = dict(self.poller.poll(timeout))
            if events:
                self.stalled = False
            if self.frontend in events:
                self._drain_frontend()
            if self.results in events:
                self._drain_results()
                self._publish_kv_events()
            if self.kv_events is not None and self.kv_events.replay in events:
                self.kv_events.serve_replay()
            now = time.monotonic()
            if now - self.last_stats >= transport.ENGINE_STATS_INTERVAL_S:
                self.last_stats = now
                self._send_stats()
                self._check_peers(now)
                if parent_pid is not None and os.getppid() != parent_pid:
                    log.error("parent process died; exiting")
                    break

    def _can_step(self) -> bool:
        return (self.scheduler is not None and not self.stalled and len(self.inflight) < self.max_inflight
                and self.scheduler.has_unfinished_requests())

    def close(self) -> None:
        transport.send(self.plan_pub, Shutdown("scheduler exiting"))
        self.ctx.destroy(linger=0)

    # ------------------------------------------------------------------ tokenizers, apis, launcher

    def _drain_frontend(self) -> None:
        while True:
            try:
                got = transport.router_recv(self.frontend, 0)
            except MessageDecodeError as e:
                log.warning("dropped a malformed message: %s", e)
                continue
            if got is None:
                return
            identity, msg = got
            try:
                self._on_frontend(identity, msg)
            except Exception:  # one bad message must not take the engine down
                log.exception("failed on %s", type(msg).__name__)

    def _on_frontend(self, identity: bytes, msg: Any) -> None:
        now = time.monotonic()
        if isinstance(msg, Heartbeat):
            if msg.sender == "api":
                self.apis[identity] = now
            else:
                self.tokenizers.setdefault(identity, PeerState(now)).last_seen = now
        elif isinstance(msg, TokenizedRequest):
            self.tokenizers.setdefault(identity, PeerState(now)).last_seen = now
            self._add_request(identity, msg)
        elif isinstance(msg, AbortRequest):
            self._abort([msg.req_id])
        elif isinstance(msg, WorkerFailed):
            self._worker_failed(f"GPU worker rank {msg.rank} died: {msg.reason}")
        elif isinstance(msg, Shutdown):
            log.info("shutdown: %s", msg.reason)
            self.running = False
        else:
            log.warning("unexpected %s on the scheduler socket", type(msg).__name__)

    def _add_request(self, identity: bytes, msg: TokenizedRequest) -> None:
        vocab_size = self.model.vocab_size
        bad = next((t for t in msg.prompt_token_ids if not 0 <= t < vocab_size), None)
        if bad is not None:  # an id past the embedding table would fail the whole step on the worker
            self._reply_error(identity, msg.req_id, f"token id {bad} is outside the model's vocabulary "
                              f"(0..{vocab_size - 1})", 400)
            return
        params = msg.sampling_params
        seed = params.seed if params.seed is not None else self.seeds.getrandbits(63)
        req = Request(msg.req_id, msg.prompt_token_ids, params, seed, self.model.eos_token_ids,
                      arrival_time=msg.arrival_time or None, grammar=msg.grammar)
        previous = self.owner.get(msg.req_id)
        if previous is not None:
            if previous[0] == identity:
                self._reply_error(identity, msg.req_id, f"request id {msg.req_id!r} is already in use", 400)
                return
            # The same id from another tokenizer: the api moved a request that had not started from a tokenizer
            # that died to a live one. The dead one's copy goes; this one runs.
            self._abort([msg.req_id])
        self.owner[msg.req_id] = identity, req
        self.tokenizers[identity].req_ids.add(msg.req_id)
        if self.scheduler is None:
            self.held[msg.req_id] = time.monotonic()
        else:
            self._queue(identity, req)

    def _queue(self, identity: bytes, req: Request) -> None:
        try:
            self.scheduler.add_request(req)
        except ValueError as e:  # the request cannot run here (too long for the cache): the client's fault
            self._forget(req.req_id)
            self._reply_error(identity, req.req_id, str(e), 400)

    def _forget(self, req_id: str) -> None:
        identity, _ = self.owner.pop(req_id)
        peer = self.tokenizers.get(identity)
        if peer is not None:
            peer.req_ids.discard(req_id)

    def _reply_error(self, identity: bytes, req_id: str, message: str, code: int) -> None:
        out = RequestOutput(req_id, [], finished=True, finish_reason="error", error=message, error_code=code)
        transport.router_send(self.frontend, identity, BatchRequestOutput([out]))

    def _abort(self, req_ids: list[str]) -> None:
        outputs = [RequestOutput(req_id, [], finished=True, finish_reason="abort")
                   for req_id in req_ids if self.held.pop(req_id, None) is not None]
        if self.scheduler is not None:
            outputs += self.scheduler.abort_requests(req_ids)
        self._route(outputs)

    def _expire_held(self, now: float) -> None:
        expired = [req_id for req_id, since in self.held.items() if now - since > HOLD_TIMEOUT_S]
        for req_id in expired:
            del self.held[req_id]
            identity, _ = self.owner[req_id]
            self._forget(req_id)
            self._reply_error(identity, req_id, f"the engine did not become ready within {HOLD_TIMEOUT_S:.0f}s "
                              "(its workers are loading or restarting); retry shortly", 503)

    def _check_peers(self, now: float) -> None:
        for identity, peer in list(self.tokenizers.items()):
            if now - peer.last_seen > transport.PEER_TIMEOUT_S:
                log.warning("tokenizer %r went silent; aborting its %d requests", identity, len(peer.req_ids))
                del self.tokenizers[identity]
                self._abort(list(peer.req_ids))
        for identity, seen in list(self.apis.items()):
            if now - seen > transport.PEER_TIMEOUT_S:
                del self.apis[identity]
        self._expire_held(now)
        if self.scheduler is not None:
            for rank, seen in self.worker_seen.items():
                if now - seen > transport.WORKER_TIMEOUT_S:
                    self._worker_failed(f"GPU worker rank {rank} stopped answering for "
                                        f"{transport.WORKER_TIMEOUT_S:.0f}s")
                    break

    def _send_stats(self) -> None:
        s = self.scheduler
        if s is None:  # loading or restarting ranks: the apis answer /health with 503
            stats = EngineStats(num_waiting=len(self.held), serving=False, data_parallel_rank=self.replica)
        else:
            running_tokens = sum(max(1, r.num_tokens - r.num_computed_tokens) for r in s.running)
            stats = EngineStats(num_running=s.num_running, num_waiting=s.num_waiting, kv_cache_usage=s.kv_usage,
                                prefix_cache_queries=s.prefix_cache_queries, prefix_cache_hits=s.prefix_cache_hits,
                                num_waiting_tokens=s.num_waiting_tokens, data_parallel_rank=self.replica,
                                num_running_tokens=running_tokens)
            if s.speculation is not None:
                spec = s.speculation.stats
                stats.spec_num_drafts, stats.spec_num_draft_tokens = spec.num_drafts, spec.num_draft_tokens
                stats.spec_num_accepted_tokens, stats.spec_accepted_per_pos = (spec.num_accepted_tokens,
                                                                               list(spec.accepted_per_pos))
        # The tokenizers route between replicas by them; with one replica there is nothing to choose.
        peers = [*self.apis, *self.tokenizers] if self.routed else self.apis
        for identity in peers:
            transport.router_send(self.frontend, identity, stats)

    def _publish_kv_events(self, extra: list[KVCacheEvent] | None = None) -> None:
        """The prefix cache's changes since the last call, as one KVEventBatch (nothing when there are none)."""
        if self.kv_events is None:
            return
        events = (self.scheduler.block_manager.take_events() if self.scheduler is not None else []) + (extra or [])
        self.kv_events.publish(events)

    # ------------------------------------------------------------------ workers

    def _start_step(self) -> None:
        plan = self.scheduler.schedule()
        if plan.is_empty:
            self.stalled = True
            if not (plan.finished_req_ids or plan.preempted_req_ids):
                return
        transport.send(self.plan_pub, plan)
        if not plan.is_empty:  # an empty plan only carries ids for the workers; no result comes back
            self.inflight.append(plan)

    def _drain_results(self) -> None:
        while True:
            try:
                msg = transport.recv_nowait(self.results)
            except MessageDecodeError as e:
                log.warning("dropped a malformed worker message: %s", e)
                continue
            if msg is None:
                return
            self._on_result(msg)

    def _on_result(self, msg: Any) -> None:
        now = time.monotonic()
        if isinstance(msg, Heartbeat):
            self.worker_seen[msg.index] = now
        elif isinstance(msg, WorkerReady):
            self._on_worker_ready(msg)
        elif isinstance(msg, StepResult):
            if not self.inflight or msg.step_id != self.inflight[0].step_id:
                log.warning("dropped a result for step %d", msg.step_id)
                return
            plan = self.inflight.popleft()
            self._route(self.scheduler.update_from_output(plan, msg))
        elif isinstance(msg, WorkerError):
            self._worker_failed(f"the GPU worker failed: {msg.message}")
        else:
            log.warning("unexpected %s from a worker", type(msg).__name__)

    def _on_worker_ready(self, msg: WorkerReady) -> None:
        self.worker_seen[msg.rank] = time.monotonic()
        if msg.rank in self.ready:
            return  # a heartbeat of a rank already registered
        self.ready[msg.rank] = msg
        log.info("worker rank %d ready on %s: %d KV blocks, loaded in %.1fs",
                 msg.rank, msg.device, msg.num_blocks, msg.load_seconds)
        if len(self.ready) == self.world_size and self.scheduler is None:
            num_blocks = min(r.num_blocks for r in self.ready.values())  # every rank must hold every block
            self.scheduler = Scheduler(self.config.scheduler, self.config.cache, num_blocks,
                                       self.model.max_model_len, self.model.kv_window,
                                       disjoint_steps=self.pp_size > 1, speculative=self.config.speculative)
            if self.kv_events is not None:
                self.scheduler.block_manager.record_events()
                self._publish_kv_events([AllBlocksCleared()])  # whatever a subscriber knew of us is gone
            log.info("engine ready: %d KV blocks of %d tokens", num_blocks, self.config.cache.block_size)
            held, self.held = list(self.held), {}
            for req_id in held:
                self._queue(self.owner[req_id][0], self.owner[req_id][1])
            self._send_stats()  # /health turns 200 now, not at the next tick

    def _worker_failed(self, reason: str) -> None:
        """Fail every request a worker has seen (its KV cache is gone) with a 503 naming what died, hold the
        ones never scheduled (they lost nothing and run once the ranks are back), then wait for the ranks."""
        if self.scheduler is not None:
            s = self.scheduler
            lost = [req_id for req_id, req in s.requests.items() if req.first_scheduled_time is not None]
            kept = [req for req in s.waiting.values() if req.first_scheduled_time is None]
            log.error("%s; failing %d requests in flight, holding %d not yet scheduled", reason, len(lost),
                      len(kept))
            outputs = s.abort_requests(lost)
            for out in outputs:
                out.finish_reason, out.error, out.error_code = "error", reason + KV_LOST, 503
            self._route(outputs)
            now = time.monotonic()
            for req in kept:
                self.held[req.req_id] = now
        else:
            log.error("%s", reason)
        self.scheduler = None
        self.ready.clear()
        self.worker_seen.clear()
        self.inflight.clear()
        self._publish_kv_events([AllBlocksCleared()])  # the ranks' KV cache died with them
        self._send_stats()  # /health turns 503 now, not at the next tick

    # ------------------------------------------------------------------ outputs

    def _route(self, outputs: list[RequestOutput]) -> None:
        by_tokenizer: dict[bytes, list[RequestOutput]] = {}
        now = time.time()  # when the scheduler saw these outputs: one clock read per batch
        for out in outputs:
            entry = self.owner.get(out.req_id)
            if entry is None:
                continue
            identity, req = entry
            # The phases ride only on the first token's output and the finishing one (cheap per token).
            if (req.first_token_time is None and out.new_token_ids) or out.finished:
                attach_phases(out, req, now)
            out.num_preemptions = req.num_preemptions
            by_tokenizer.setdefault(identity, []).append(out)
            if out.finished:
                del self.owner[out.req_id]
                peer = self.tokenizers.get(identity)
                if peer is not None:
                    peer.req_ids.discard(out.req_id)
        step = self.inflight[0].step_id if self.inflight else 0
        for identity, outs in by_tokenizer.items():
            transport.router_send(self.frontend, identity, BatchRequestOutput(outs, step))


def attach_phases(out: RequestOutput, req: Request, now: float) -> None:
    """Set out's timings (see RequestTimings) from req's timestamps; `now` is when the scheduler saw out.

    Called for the output that carries req's first token (which stamps req.first_token_time) and for the one
    that finishes req. Every timestamp is wall clock (time.time()); arrival_time is the api's, so ingest
    crosses processes: clamped at 0 in case the api runs on a host whose clock is ahead.
    """
    timings = out.timings = RequestTimings(ingest=max(0.0, req.queued_time - req.arrival_time))
    scheduled = req.first_scheduled_time
    if scheduled is None:  # finished (aborted, failed) before it was ever scheduled
        return
    timings.queue = scheduled - req.queued_time
    if req.first_token_time is None and out.new_token_ids:
        req.first_token_time = now
        timings.prefill = now - scheduled
    if out.finished:
        timings.inference = now - scheduled
        if req.first_token_time is not None:
            timings.decode = now - req.first_token_time


def main(config_dict: dict[str, Any], index: int = 0) -> None:
    """Process entry: `main(config.to_dict(), replica)`."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s scheduler-{index} %(levelname)s %(message)s")
    config = EngineConfig.from_dict(config_dict)
    service = SchedulerService(config, plan_for(config), index)
    freeze_startup_heap()
    log.info("scheduler up; waiting for %d worker rank(s)", config.parallel.world_size)
    try:
        service.run(parent_pid=os.getppid())
    finally:
        service.close()
