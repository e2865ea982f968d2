"""The scheduler under pipeline parallelism: several steps in flight with disjoint requests, and each
request's last sampled token carried in the plan for the stages that did not sample it.

The fake worker here is stage 0's view: it never keeps the tokens it samples (the last stage samples), so
its token lists grow only from the plans. A request's output still matches the scheduler-free reference,
through chunked prefill, prefix caching and preemption, only if every token reached it exactly once."""

from __future__ import annotations

import random

from headrace.common.config import CacheConfig, SchedulerConfig
from headrace.common.messages import StepPlan, StepResult
from headrace.services.scheduler.scheduler import Scheduler
from tests.services.scheduler.test_scheduler import FakeWorker, drive, make_req, random_prompt, reference_output


class FirstStageWorker(FakeWorker):
    """Learns sampled tokens only from `CachedRequestData.new_token_ids`, and checks that no request is in
    two steps in flight."""

    def __init__(self, num_blocks: int, block_size: int, depth: int) -> None:
        super().__init__(num_blocks, block_size)
        self.depth = depth
        self.recent: list[set[str]] = []

    def execute(self, plan: StepPlan) -> StepResult:
        ids = set(plan.num_scheduled_tokens)
        for earlier in self.recent[-(self.depth - 1):] if self.depth > 1 else []:
            assert not ids & earlier, f"{ids & earlier} planned while a step of theirs is in flight"
        self.recent.append(ids)
        for cached in plan.cached_requests:
            state = self.reqs[cached.req_id]
            missing = cached.num_computed_tokens + plan.num_scheduled_tokens[cached.req_id] - len(state.tokens)
            if missing > 0:
                state.tokens.extend(cached.new_token_ids[-missing:])
        result = super().execute(plan)
        for req_id in result.req_ids:
            self.reqs[req_id].tokens.pop()  # stage 0 never holds what the last stage sampled
        return result


def run_pipelined(depth: int, num_blocks: int, prefix_caching: bool, threshold: int | None, seed: int):
    rng = random.Random(seed)
    shared = random_prompt(rng, 24)
    reqs = [make_req(f"r{i}", (shared if i % 2 else []) + random_prompt(rng, rng.randint(1, 30)),
                     ignore_eos=True, max_tokens=rng.randint(1, 24)) for i in range(12)]
    cache = CacheConfig(block_size=8, enable_prefix_caching=prefix_caching)
    sched = Scheduler(SchedulerConfig(8, 48, threshold), cache, num_blocks, 256, disjoint_steps=True)
    # The service keeps `depth` steps in flight: drive's lookahead is exactly that.
    run = drive(sched, {0: reqs[:6], 5: reqs[6:]}, worker=FirstStageWorker(num_blocks, 8, depth), lookahead=depth)
    for req in reqs:
        assert run.tokens(req.req_id) == reference_output(req, 256)[0], req.req_id
    return sched, run


def test_micro_batches_are_disjoint_and_every_token_reaches_the_first_stage():
    sched, run = run_pipelined(depth=3, num_blocks=128, prefix_caching=False, threshold=None, seed=0)
    assert sum(1 for p in run.plans if p.is_empty) > 0  # some steps found every running request in flight


def test_chunked_prefill_prefix_caching_and_preemption_under_pipelines():
    sched, run = run_pipelined(depth=2, num_blocks=14, prefix_caching=True, threshold=8, seed=1)
    assert sched.num_preemptions > 0
    assert sched.prefix_cache_hits > 0
