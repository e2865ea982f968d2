"""Policy tests: the scheduler driven by a fake worker that keeps a fake paged KV pool.

The fake worker keeps per-request state from the plans exactly as the real one must (new requests in
full, cached ones as deltas), writes each computed position's fake KV (a hash of the prefix up to it)
into its slot through the block table, checks the whole history reads back before it samples, and
samples a token that depends only on the request's token history. So a request's output is fixed by
its prompt whatever the scheduling, and any block-table, prefix-cache or preemption mistake shows up
as a wrong token or a failed check.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headrace.common.config import CacheConfig, SchedulerConfig
from headrace.common.messages import RequestOutput, StepPlan, StepResult
from headrace.common.sampling_params import SamplingParams
from headrace.services.scheduler.request import Request
from headrace.services.scheduler.scheduler import Scheduler

VOCAB = 64
EOS = 0


def next_token(history: list[int]) -> int:
    """The fake model: deterministic in the token history alone."""
    prev = history[-2] if len(history) > 1 else 5
    return (31 * history[-1] + 17 * prev + 7 * len(history)) % VOCAB


@dataclass
class _WorkerState:
    tokens: list[int]
    block_ids: list[int]
    num_computed: int
    # What the KV slot of each position holds: a hash of the whole prefix up to it, as real KV depends
    # on every token before it (the same block of tokens after another prefix must not read back equal).
    kv_values: list[int] = field(default_factory=list)

    def kv_value(self, pos: int) -> int:
        while len(self.kv_values) <= pos:
            prev = self.kv_values[-1] if self.kv_values else 0
            self.kv_values.append(hash((prev, self.tokens[len(self.kv_values)])))
        return self.kv_values[pos]


class FakeWorker:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]  # fake KV pool
        self.reqs: dict[str, _WorkerState] = {}

    def execute(self, plan: StepPlan) -> StepResult:
        for req_id in plan.finished_req_ids + plan.preempted_req_ids:
            assert self.reqs.pop(req_id, None) is not None, f"told to drop {req_id}, which it does not hold"
        for new in plan.new_requests:
            assert new.req_id not in self.reqs
            self.reqs[new.req_id] = _WorkerState(new.prompt_token_ids + new.output_token_ids,
                                                 list(new.block_ids), new.num_computed_tokens)
        for cached in plan.cached_requests:
            state = self.reqs[cached.req_id]
            assert state.num_computed == cached.num_computed_tokens
            state.block_ids += cached.new_block_ids
        assert list(plan.num_scheduled_tokens) == ([r.req_id for r in plan.new_requests]
                                                   + [r.req_id for r in plan.cached_requests])

        # Blocks written this step must belong to their writer alone (shared prefix blocks are read-only).
        holders: dict[int, int] = {}
        for state in self.reqs.values():
            for b in state.block_ids:
                holders[b] = holders.get(b, 0) + 1
        bs = self.block_size
        req_ids, sampled = [], []
        for req_id, n in plan.num_scheduled_tokens.items():
            state = self.reqs[req_id]
            start, end = state.num_computed, state.num_computed + n
            assert 0 < n and end <= len(state.tokens) and end <= len(state.block_ids) * bs
            for pos in range(start, end):
                block = state.block_ids[pos // bs]
                assert holders[block] == 1, f"{req_id} writes block {block}, shared with another request"
                self.kv[block][pos % bs] = state.kv_value(pos)
            state.num_computed = end
            if end == len(state.tokens):  # reached the end of what it knows: sample
                read_back = [self.kv[state.block_ids[p // bs]][p % bs] for p in range(end)]
                assert read_back == [state.kv_value(p) for p in range(end)], \
                    f"{req_id}: the KV cache does not hold its history"
                token = next_token(state.tokens)
                state.tokens.append(token)
                req_ids.append(req_id)
                sampled.append(token)
        return StepResult(plan.step_id, req_ids, sampled, [None] * len(req_ids))


def make_scheduler(num_blocks: int = 64, block_size: int = 8, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 64, max_model_len: int = 256, prefix_caching: bool = False,
                   long_prefill_token_threshold: int | None = None) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens, long_prefill_token_threshold),
                     CacheConfig(block_size=block_size, enable_prefix_caching=prefix_caching),
                     num_blocks, max_model_len)


def make_req(req_id: str, prompt: list[int], eos: tuple[int, ...] = (EOS,), **params) -> Request:
    params.setdefault("max_tokens", 16)
    return Request(req_id, prompt, SamplingParams(**params), sampling_seed=0, eos_token_ids=eos)


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(length)]


@dataclass
class Run:
    outputs: dict[str, list[RequestOutput]] = field(default_factory=dict)
    plans: list[StepPlan] = field(default_factory=list)

    def tokens(self, req_id: str) -> list[int]:
        return [t for out in self.outputs[req_id] for t in out.new_token_ids]

    def finish(self, req_id: str) -> RequestOutput:
        finished = [out for out in self.outputs[req_id] if out.finished]
        assert len(finished) == 1, f"{req_id} finished {len(finished)} times"
        assert finished[0] is self.outputs[req_id][-1], f"{req_id} got output after finishing"
        return finished[0]


def drive(sched: Scheduler, arrivals: dict[int, list[Request]], aborts: dict[int, list[str]] | None = None,
          worker: FakeWorker | None = None, max_steps: int = 100_000, lookahead: int = 1) -> Run:
    """Run the engine loop until every request is done, checking each plan's limits.

    aborts[step] lands before that step's schedule() for even-numbered steps, and between schedule() and
    update_from_output() for odd ones (a client disconnecting while the GPU runs the step). With lookahead 2
    the loop plans step t+1 before step t's tokens come back, as the scheduler process does.
    """
    aborts = aborts or {}
    bm = sched.block_manager
    worker = worker or FakeWorker(bm.num_blocks, bm.block_size)
    run = Run()
    last_arrival = max(arrivals, default=0)
    in_flight: deque[tuple[StepPlan, StepResult]] = deque()

    def deliver(outs: list[RequestOutput]) -> None:
        plan, result = in_flight.popleft()
        outs += sched.update_from_output(plan, result)
        for out in outs:
            assert out.new_token_ids or out.finished
            run.outputs[out.req_id].append(out)

    for step in range(max_steps):
        for req in arrivals.get(step, []):
            sched.add_request(req)
            run.outputs[req.req_id] = []
        if step > last_arrival and not sched.has_unfinished_requests():
            while in_flight:  # the tokens of steps planned ahead of time go nowhere now
                deliver([])
            break
        outs = sched.abort_requests(aborts.get(step, [])) if step % 2 == 0 else []
        plan = sched.schedule()
        assert plan.total_num_scheduled_tokens <= sched.max_num_batched_tokens
        assert len(plan.num_scheduled_tokens) <= min(sched.num_running, sched.max_num_seqs)
        run.plans.append(plan)
        in_flight.append((plan, worker.execute(plan)))
        if step % 2 == 1:
            outs += sched.abort_requests(aborts.get(step, []))
        if len(in_flight) >= lookahead:
            deliver(outs)
        else:
            for out in outs:
                run.outputs[out.req_id].append(out)
    else:
        pytest.fail("requests did not finish")
    # The last finished ids reach the worker with the next plan.
    worker.execute(sched.schedule())
    assert not worker.reqs
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    assert sched.num_running == sched.num_waiting == 0
    return run


def reference_output(req: Request, max_model_len: int) -> tuple[list[int], str, int | None]:
    """What the request must produce: its tokens, finish reason and stop reason, without any scheduler."""
    p = req.sampling_params
    history = list(req.prompt_token_ids)
    max_tokens = min(p.max_tokens or max_model_len, max(1, max_model_len - len(history)))
    out: list[int] = []
    while True:
        token = next_token(history)
        history.append(token)
        out.append(token)
        if len(out) >= p.min_tokens:
            if token in req.eos_token_ids and not p.ignore_eos:
                return out, "stop", None
            if token in p.stop_token_ids:
                return out, "stop", token
        if len(out) >= max_tokens:
            return out, "length", None


# --------------------------------------------------------------------------- limits and chunked prefill


def test_plans_respect_budget_and_max_num_seqs():
    rng = random.Random(0)
    sched = make_scheduler(max_num_seqs=4, max_num_batched_tokens=32)
    reqs = [make_req(f"r{i}", random_prompt(rng, rng.randint(1, 60)), max_tokens=rng.randint(1, 20))
            for i in range(20)]
    run = drive(sched, {0: reqs})
    assert max(len(p.num_scheduled_tokens) for p in run.plans) == 4
    assert max(p.total_num_scheduled_tokens for p in run.plans) == 32
    for req in reqs:
        tokens, reason, _ = reference_output(req, 256)
        assert run.tokens(req.req_id) == tokens and run.finish(req.req_id).finish_reason == reason


def test_long_prompt_is_chunked_and_decodes_keep_running_beside_it():
    sched = make_scheduler(max_num_batched_tokens=32, num_blocks=128)
    short = [make_req(f"s{i}", [i + 1] * 4, ignore_eos=True, max_tokens=40) for i in range(3)]
    long = make_req("long", list(range(1, 201)), max_tokens=2)
    run = drive(sched, {0: short, 3: [long]})
    chunks = [p for p in run.plans if "long" in p.num_scheduled_tokens]
    prefill_chunks = chunks[:-2]  # the last two steps are its own decodes
    assert sum(p.num_scheduled_tokens["long"] for p in chunks) == 200 + 1
    assert len(prefill_chunks) >= 200 // 32
    for p in prefill_chunks:
        # Every short request was decoding (40 tokens each) and got its token in the same step.
        assert all(p.num_scheduled_tokens.get(s.req_id) == 1 for s in short)
        assert p.num_scheduled_tokens["long"] <= 32 - 3
    assert run.tokens("long") == reference_output(long, 256)[0]


def test_a_prefill_chunk_leaves_a_token_for_each_request_behind_it():
    sched = make_scheduler(max_num_batched_tokens=16, max_num_seqs=16, num_blocks=128)
    worker = FakeWorker(128, 8)
    for i in range(10):
        sched.add_request(make_req(f"s{i}", [i + 1], ignore_eos=True, max_tokens=50))
    sched.add_request(make_req("long", list(range(1, 101)), max_tokens=1))
    plan = sched.schedule()
    sched.update_from_output(plan, worker.execute(plan))
    assert plan.num_scheduled_tokens["long"] == 6
    # Put the prefill ahead of the decodes (admission order normally keeps it behind them).
    sched.running.insert(0, sched.running.pop())
    plan = sched.schedule()
    assert plan.num_scheduled_tokens["long"] == 6
    assert all(plan.num_scheduled_tokens[f"s{i}"] == 1 for i in range(10))


def test_long_prefill_token_threshold_caps_chunks():
    sched = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=10, num_blocks=128)
    req = make_req("r", list(range(1, 101)), max_tokens=1)
    run = drive(sched, {0: [req]})
    assert [p.num_scheduled_tokens["r"] for p in run.plans if p.num_scheduled_tokens] == [10] * 10


def test_admission_keeps_the_watermark_free_while_others_run():
    # 200 blocks: a watermark of 2. "b" needs 198 blocks at once; with "a" holding one, that would
    # leave a single free block, so b waits until a is done (alone, it needs no headroom).
    sched = make_scheduler(num_blocks=200, max_num_batched_tokens=2048, max_model_len=2048)
    a = make_req("a", [1] * 8, max_tokens=5, ignore_eos=True)
    b = make_req("b", [2] * (198 * 8), max_tokens=1)
    run = drive(sched, {0: [a], 1: [b]})
    first_b = next(i for i, p in enumerate(run.plans) if "b" in p.num_scheduled_tokens)
    assert first_b == 5 and all("a" not in p.num_scheduled_tokens for p in run.plans[first_b:])


def test_batch_order_is_new_then_cached_and_new_requests_are_sent_once():
    sched = make_scheduler()
    run = drive(sched, {0: [make_req("a", [1, 2, 3])], 2: [make_req("b", [4, 5, 6])]})
    plan = run.plans[2]
    assert list(plan.num_scheduled_tokens) == ["b", "a"]
    assert [r.req_id for r in plan.new_requests] == ["b"] and [r.req_id for r in plan.cached_requests] == ["a"]
    sent_new = [r.req_id for p in run.plans for r in p.new_requests]
    assert sorted(sent_new) == ["a", "b"]


def test_num_computed_tokens_in_plan_is_the_count_before_the_step():
    sched = make_scheduler(max_num_batched_tokens=16)
    sched.add_request(make_req("r", list(range(1, 41))))
    plans = [sched.schedule() for _ in range(3)]  # no results needed while still prefilling
    assert plans[0].new_requests[0].num_computed_tokens == 0
    assert [c.num_computed_tokens for p in plans[1:] for c in p.cached_requests] == [16, 32]
    assert [p.num_scheduled_tokens["r"] for p in plans] == [16, 16, 8]
    assert sched.requests["r"].num_computed_tokens == 40


# --------------------------------------------------------------------------- preemption


def test_preempted_requests_resume_and_produce_the_unconstrained_tokens():
    rng = random.Random(1)
    prompts = [random_prompt(rng, rng.randint(10, 40)) for _ in range(10)]

    def requests() -> list[Request]:
        return [make_req(f"r{i}", p, ignore_eos=True, max_tokens=30) for i, p in enumerate(prompts)]

    free = drive(make_scheduler(num_blocks=200), {0: requests()})
    tight_sched = make_scheduler(num_blocks=10)  # 80 tokens of KV for 10 requests of up to 70
    tight = drive(tight_sched, {0: requests()})
    assert tight_sched.num_preemptions > 0
    assert any(p.preempted_req_ids for p in tight.plans)
    for i in range(10):
        assert tight.tokens(f"r{i}") == free.tokens(f"r{i}")
        assert len(tight.tokens(f"r{i}")) == 30


def test_preemption_takes_the_newest_request_and_resumes_it_with_its_outputs():
    sched = make_scheduler(num_blocks=4, block_size=8)  # 32 slots, no watermark at this size
    a = make_req("a", list(range(1, 15)), ignore_eos=True, max_tokens=16)  # grows to 29 tokens of KV
    b = make_req("b", list(range(20, 30)), ignore_eos=True, max_tokens=16)
    sched.add_request(a)
    sched.add_request(b)
    worker = FakeWorker(4, 8)
    preempted_at = None
    for _ in range(50):
        plan = sched.schedule()
        if plan.preempted_req_ids and preempted_at is None:
            preempted_at = list(b.output_token_ids)
            assert plan.preempted_req_ids == ["b"]  # the most recently admitted goes
            assert "b" not in plan.num_scheduled_tokens and sched.waiting["b"] is b
            assert b.block_ids == [] and b.num_computed_tokens == 0
        resumed = [r for r in plan.new_requests if r.req_id == "b" and preempted_at is not None]
        if resumed:
            assert resumed[0].output_token_ids == preempted_at and preempted_at
            assert resumed[0].num_computed_tokens == 0
            assert plan.num_scheduled_tokens["b"] == b.num_tokens  # prompt + outputs recomputed
            break
        sched.update_from_output(plan, worker.execute(plan))
    else:
        pytest.fail("b was never preempted and resumed")
    assert sched.num_preemptions == b.num_preemptions == 1


def test_the_last_running_request_preempts_itself_when_it_cannot_grow():
    sched = make_scheduler(num_blocks=4, block_size=8)
    a = make_req("a", list(range(1, 13)), ignore_eos=True, max_tokens=3)  # 12 tokens: room in 2 blocks
    b = make_req("b", list(range(20, 36)), ignore_eos=True, max_tokens=3)  # 16 tokens: 2 full blocks
    sched.add_request(a)
    sched.add_request(b)
    worker = FakeWorker(4, 8)
    plan = sched.schedule()
    sched.update_from_output(plan, worker.execute(plan))
    plan = sched.schedule()  # a decodes in place; b needs a 3rd block, none is free, nobody is behind it
    assert plan.preempted_req_ids == ["b"] and list(plan.num_scheduled_tokens) == ["a"]
    assert sched.num_running == 1 and sched.waiting["b"] is b
    sched.update_from_output(plan, worker.execute(plan))


def test_add_request_rejects_a_request_the_pool_can_never_hold():
    sched = make_scheduler(num_blocks=4, block_size=8)  # 32 slots
    with pytest.raises(ValueError, match="KV blocks"):
        sched.add_request(make_req("big", list(range(1, 10)), max_tokens=25))  # 33 tokens of KV
    run = drive(sched, {0: [make_req("fits", list(range(1, 10)), max_tokens=24, ignore_eos=True)]})  # 32
    assert len(run.tokens("fits")) == 24


# --------------------------------------------------------------------------- prefix caching


def test_shared_prefix_is_served_from_the_cache():
    sched = make_scheduler(prefix_caching=True, block_size=8)
    system = list(range(1, 33))  # 4 full blocks
    a = make_req("a", system + [40, 41, 42], max_tokens=3, ignore_eos=True)
    b = make_req("b", system + [50, 51], max_tokens=3, ignore_eos=True)
    run = drive(sched, {0: [a], 5: [b]})
    assert run.outputs["a"][0].num_cached_tokens == 0
    assert run.outputs["b"][0].num_cached_tokens == 32 and run.finish("b").num_cached_tokens == 32
    new_b = next(r for p in run.plans for r in p.new_requests if r.req_id == "b")
    assert new_b.num_computed_tokens == 32
    assert run.plans[5].num_scheduled_tokens["b"] == 2  # only the suffix runs
    assert run.tokens("b") == reference_output(b, 256)[0]


def test_prefix_cache_counts_each_prompt_once_at_its_first_admission():
    sched = make_scheduler(prefix_caching=True, block_size=8, num_blocks=8)
    system = list(range(1, 33))  # 4 full blocks
    a = make_req("a", system + [40, 41, 42], max_tokens=3, ignore_eos=True)
    b = make_req("b", system + [50, 51], max_tokens=3, ignore_eos=True)
    drive(sched, {0: [a], 5: [b]})
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (35 + 34, 32)
    off = make_scheduler(prefix_caching=False, block_size=8)
    drive(off, {0: [make_req("c", system, max_tokens=2, ignore_eos=True)]})
    assert (off.prefix_cache_queries, off.prefix_cache_hits) == (0, 0)  # no cache, nothing looked up


def test_prefix_blocks_are_shared_while_both_run():
    sched = make_scheduler(prefix_caching=True, block_size=8)
    bm = sched.block_manager
    a = make_req("a", list(range(1, 18)), max_tokens=20, ignore_eos=True)
    sched.add_request(a)
    worker = FakeWorker(bm.num_blocks, 8)
    plan = sched.schedule()
    sched.update_from_output(plan, worker.execute(plan))
    b = make_req("b", list(range(1, 18)), max_tokens=20, ignore_eos=True)
    sched.add_request(b)
    plan = sched.schedule()
    sched.update_from_output(plan, worker.execute(plan))
    assert b.num_cached_tokens == 16 and b.block_ids[:2] == a.block_ids[:2]
    assert [bm.blocks[i].ref_count for i in a.block_ids[:2]] == [2, 2]
    sched.abort_requests(["a"])
    assert [bm.blocks[i].ref_count for i in b.block_ids[:2]] == [1, 1]
    sched.abort_requests(["b"])
    assert bm.num_free_blocks == bm.num_blocks and all(blk.ref_count == 0 for blk in bm.blocks)


def test_cached_blocks_are_evicted_when_the_pool_is_needed():
    sched = make_scheduler(prefix_caching=True, block_size=8, num_blocks=8)
    bm = sched.block_manager
    worker = FakeWorker(8, 8)  # one worker throughout: the KV it holds outlives each run
    drive(sched, {0: [make_req("a", list(range(1, 33)), max_tokens=1)]}, worker=worker)
    assert bm.num_cached_blocks == 4 and bm.num_free_blocks == 8
    run = drive(sched, {0: [make_req("a2", list(range(1, 33)), max_tokens=1)]}, worker=worker)
    assert run.outputs["a2"][0].num_cached_tokens == 24
    # A different prompt that needs the whole pool reuses (evicts) the cached blocks.
    drive(sched, {0: [make_req("b", list(range(1, 61))[::-1], max_tokens=3, ignore_eos=True)]}, worker=worker)
    run = drive(sched, {0: [make_req("c", list(range(1, 33)), max_tokens=1)]}, worker=worker)
    assert run.outputs["c"][0].num_cached_tokens == 0


# --------------------------------------------------------------------------- finishing


@pytest.mark.parametrize("params, eos, reason", [
    (dict(max_tokens=5, ignore_eos=True), (), "length"),
    (dict(max_tokens=50), "first", "stop"),  # EOS = the first token the fake model samples
    (dict(max_tokens=5, ignore_eos=True), "first", "length"),
    (dict(max_tokens=50, stop_token_ids=["first"]), (), "stop"),
])
def test_finish_reasons(params, eos, reason):
    prompt = [3, 7, 11]
    first = next_token(prompt)
    eos = (first,) if eos == "first" else eos
    params = {k: [first] if v == ["first"] else v for k, v in params.items()}
    req = make_req("r", prompt, eos=eos, **params)
    run = drive(make_scheduler(), {0: [req]})
    out = run.finish("r")
    assert out.finish_reason == reason
    assert run.tokens("r") == reference_output(req, 256)[0]
    if reason == "stop":
        assert run.tokens("r") == [first]
        assert out.stop_reason == (first if params.get("stop_token_ids") else None)
    else:
        assert len(run.tokens("r")) == 5


def test_min_tokens_holds_off_eos_and_stop_tokens():
    prompt = [3, 7, 11]
    first = next_token(prompt)
    req = make_req("r", prompt, eos=(first,), stop_token_ids=[first], min_tokens=4, max_tokens=30)
    run = drive(make_scheduler(), {0: [req]})
    tokens = run.tokens("r")
    assert tokens[0] == first and len(tokens) >= 4
    assert tokens == reference_output(req, 256)[0]


def test_max_model_len_caps_generation():
    req = make_req("r", list(range(1, 29)), max_tokens=None, ignore_eos=True)
    run = drive(make_scheduler(max_model_len=32), {0: [req]})
    assert len(run.tokens("r")) == 4 and run.finish("r").finish_reason == "length"
    full = make_req("full", list(range(1, 33)), max_tokens=10, ignore_eos=True)
    run = drive(make_scheduler(max_model_len=32), {0: [full]})
    assert len(run.tokens("full")) == 1 and run.finish("full").finish_reason == "length"


def test_add_request_rejects_what_can_never_run():
    sched = make_scheduler(max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_request(make_req("long", list(range(33))))
    with pytest.raises(ValueError, match="empty"):
        sched.add_request(make_req("empty", []))
    sched.add_request(make_req("a", [1]))
    with pytest.raises(ValueError, match="already"):
        sched.add_request(make_req("a", [1]))


def test_abort_frees_every_block_at_once_and_tells_the_worker_only_what_it_holds():
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=256, num_blocks=64)
    bm = sched.block_manager
    for i in range(3):
        sched.add_request(make_req(f"r{i}", list(range(1, 50)), max_tokens=100, ignore_eos=True))
    worker = FakeWorker(bm.num_blocks, bm.block_size)
    for _ in range(3):
        plan = sched.schedule()
        sched.update_from_output(plan, worker.execute(plan))
    assert sched.num_running == 2 and sched.num_waiting == 1 and bm.num_free_blocks < bm.num_blocks
    outs = sched.abort_requests(["r0", "r2", "unknown"])
    assert [(o.req_id, o.finished, o.finish_reason) for o in outs] == [("r0", True, "abort"), ("r2", True, "abort")]
    assert sched.num_running == 1 and sched.num_waiting == 0
    held_by_r1 = len(sched.requests["r1"].block_ids)
    assert bm.num_free_blocks == bm.num_blocks - held_by_r1
    sched.abort_requests(["r1"])
    assert bm.num_free_blocks == bm.num_blocks and not sched.has_unfinished_requests()
    plan = sched.schedule()
    assert plan.is_empty and sorted(plan.finished_req_ids) == ["r0", "r1"]  # r2 never reached the worker
    worker.execute(plan)
    assert not worker.reqs


def test_a_request_whose_last_token_is_in_flight_gives_up_its_seat():
    """With steps planned ahead (async scheduling), a waiting request takes the seat of one whose last
    token is still being sampled, in the very next plan."""
    sched = make_scheduler(max_num_seqs=1)
    a, b = make_req("a", [1, 2, 3], max_tokens=2, ignore_eos=True), make_req("b", [4, 5], max_tokens=2)
    run = drive(sched, {0: [a, b]}, lookahead=2)
    assert [list(p.num_scheduled_tokens.items()) for p in run.plans[:3]] == [
        [("a", 3)], [("a", 1)], [("b", 2)]]  # plan 2 runs while plan 1 samples a's last token
    assert all(len(p.num_scheduled_tokens) <= 1 for p in run.plans)
    assert len(run.tokens("a")) == 2 and len(run.tokens("b")) == 2


def test_token_arriving_after_abort_is_dropped():
    sched = make_scheduler()
    sched.add_request(make_req("r", [1, 2, 3]))
    plan = sched.schedule()
    result = FakeWorker(64, 8).execute(plan)
    sched.abort_requests(["r"])
    assert sched.update_from_output(plan, result) == []


# --------------------------------------------------------------------------- everything at once


def check_request(req: Request, run: Run, aborted: set[str], max_model_len: int) -> None:
    out = run.finish(req.req_id)
    tokens = run.tokens(req.req_id)
    expected, reason, stop_reason = reference_output(req, max_model_len)
    assert out.num_prompt_tokens == req.num_prompt_tokens
    if out.finish_reason == "abort":
        assert req.req_id in aborted
        assert tokens == expected[:len(tokens)] and len(tokens) < len(expected)
    else:
        assert (tokens, out.finish_reason, out.stop_reason) == (expected, reason, stop_reason)


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), block_size=st.sampled_from([8, 16]), num_blocks=st.integers(16, 48),
       prefix_caching=st.booleans(), max_num_seqs=st.integers(1, 32),
       max_num_batched_tokens=st.sampled_from([16, 48, 128]), lookahead=st.sampled_from([1, 2]))
def test_thousand_random_requests_all_finish_exactly_once(seed, block_size, num_blocks, prefix_caching,
                                                          max_num_seqs, max_num_batched_tokens, lookahead):
    rng = random.Random(seed)
    max_model_len = 128
    sched = make_scheduler(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                           prefix_caching=prefix_caching)
    system_prompts = [random_prompt(rng, rng.randint(8, 40)) for _ in range(4)]
    arrivals: dict[int, list[Request]] = {}
    reqs = []
    for i in range(1000):
        prompt = random_prompt(rng, rng.randint(1, 80))
        if rng.random() < 0.5:
            prompt = (rng.choice(system_prompts) + prompt)[:max_model_len]
        min_tokens = rng.choice([0, 0, 3])
        req = make_req(
            f"r{i}", prompt, eos=(EOS,), max_tokens=rng.choice([None, rng.randint(max(1, min_tokens), 60)]),
            min_tokens=min_tokens, ignore_eos=rng.random() < 0.2,
            stop_token_ids=rng.sample(range(1, VOCAB), rng.choice([0, 0, 1])))
        reqs.append(req)
        arrivals.setdefault(rng.randrange(400), []).append(req)
    aborted = {f"r{i}" for i in rng.sample(range(1000), 100)}
    aborts: dict[int, list[str]] = {}
    for req_id in sorted(aborted):
        aborts.setdefault(rng.randrange(600), []).append(req_id)

    run = drive(sched, arrivals, aborts, lookahead=lookahead)
    assert set(run.outputs) == {r.req_id for r in reqs}
    for req in reqs:
        check_request(req, run, aborted, max_model_len)


def test_one_client_with_many_sequences_cannot_starve_another():
    """A body of 60 sequences arrives first, a 2-token request right after: the small one takes its turn at
    the first free seat, not after the 60 (FCFS would make it wait for every one of them)."""
    sched = make_scheduler(num_blocks=256, max_num_seqs=4)
    big = [make_req(f"cmpl-big-{k}", [1, 2, 3], max_tokens=8, ignore_eos=True) for k in range(60)]
    small = make_req("cmpl-small-0", [4, 5], max_tokens=2, ignore_eos=True)
    run = drive(sched, {0: big + [small]})
    first_scheduled = {req_id: next(i for i, plan in enumerate(run.plans) if req_id in plan.num_scheduled_tokens)
                   for req_id in ("cmpl-small-0", "cmpl-big-59")}
    assert first_scheduled["cmpl-small-0"] <= 1 < first_scheduled["cmpl-big-59"]
    assert run.tokens("cmpl-small-0") and run.finish("cmpl-small-0").finish_reason == "length"
    # Within one group, first come first served.
    first = [next(i for i, p in enumerate(run.plans) if f"cmpl-big-{k}" in p.num_scheduled_tokens) for k in range(60)]
    assert first == sorted(first)


def test_a_request_the_worker_could_not_serve_fails_alone_with_a_400():
    sched = make_scheduler()
    worker = FakeWorker(64, 8)
    for rid in ("a", "b"):
        sched.add_request(make_req(rid, [1, 2, 3], ignore_eos=True, max_tokens=4))
    plan = sched.schedule()
    result = worker.execute(plan)
    result.failed = {"a": "the grammar could not be compiled"}
    outs = {o.req_id: o for o in sched.update_from_output(plan, result)}
    assert outs["a"].finished and outs["a"].finish_reason == "error" and outs["a"].error_code == 400
    assert outs["a"].error == "the grammar could not be compiled" and outs["a"].new_token_ids == []
    assert not outs["b"].finished and len(outs["b"].new_token_ids) == 1
    plan = sched.schedule()
    assert plan.finished_req_ids == ["a"] and list(plan.num_scheduled_tokens) == ["b"]
