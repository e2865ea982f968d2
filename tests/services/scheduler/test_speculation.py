"""Speculative decoding on the scheduler's side: the n-gram proposer, the KV rollback of rejected drafts
(block trimming, prefix-cache commits of accepted tokens only), and whole runs against a fake worker that
verifies drafts as the real one does: outputs are exactly those without speculation, through preemption,
prefix caching, aborts and async planning."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headrace.common.config import CacheConfig, ConfigError, SchedulerConfig, SpeculativeConfig
from headrace.common.messages import StepPlan, StepResult
from headrace.services.scheduler.block_manager import BlockManager
from headrace.services.scheduler.scheduler import Scheduler
from headrace.services.scheduler.speculation import NgramProposer, SpecDecodeStats
from tests.services.scheduler.test_scheduler import FakeWorker, drive, make_req

VOCAB = 64


# --------------------------------------------------------------------------- the proposer


def test_ngram_proposes_what_followed_the_most_recent_earlier_match():
    p = NgramProposer(3, 1, 3)
    assert p.propose([1, 2, 3, 4, 5, 9, 1, 2, 3]) == [4, 5, 9]
    # Two earlier occurrences of the suffix: the most recent one's continuation.
    assert p.propose([7, 8, 1, 7, 8, 2, 7, 8]) == [2, 7, 8]
    # The longest suffix that occurs wins over a more recent shorter one.
    assert p.propose([5, 6, 7, 1, 9, 7, 2, 5, 6, 7]) == [1, 9, 7]


def test_ngram_caps_the_drafts_and_needs_min_n():
    assert NgramProposer(2, 1, 3).propose([1, 2, 3, 4, 1, 2]) == [3, 4]
    assert NgramProposer(4, 1, 3).propose([1, 2, 3, 4, 1, 2], max_drafts=1) == [3]
    assert NgramProposer(4, 1, 3).propose([1, 2, 3, 4, 1, 2], max_drafts=0) == []
    # The continuation is cut at the end of the sequence.
    assert NgramProposer(5, 1, 2).propose([3, 4, 3, 4]) == [3, 4]
    assert NgramProposer(3, 2, 3).propose([1, 2, 3, 9, 3]) == []  # only a 1-gram matches
    assert NgramProposer(3, 1, 3).propose([1, 2, 3]) == []
    assert NgramProposer(3, 1, 3).propose([4]) == []


def test_stats_count_drafts_accepted_and_positions():
    s = SpecDecodeStats()
    s.observe(3, 2)
    s.observe(2, 0)
    s.observe(4, 4)
    assert (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens) == (3, 9, 6)
    assert s.accepted_per_pos == [2, 2, 1, 1]
    assert s.mean_acceptance_length == 3.0


def test_speculative_config_rejects_bad_json_and_fields():
    assert SpeculativeConfig.from_json(None) is None
    cfg = SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}')
    assert (cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (5, 1, 4)
    for text, match in (("{x", "not valid JSON"), ("[1]", "JSON object"), ('{"method": "eagle"}', "not supported"),
                        ('{"num_speculative_tokens": 0}', ">= 1"), ('{"k": 1}', "unknown field"),
                        ('{"prompt_lookup_min": 4, "prompt_lookup_max": 2}', "must not exceed"),
                        ('{"disable_by_batch_size": "8"}', "disable_by_batch_size"),
                        ('{"method": "draft_model"}', 'needs "model"'), ('{"model": ""}', 'needs "model"'),
                        ('{"method": "ngram", "model": "/m"}', 'is for method "draft_model"')):
        with pytest.raises(ConfigError, match=match):
            SpeculativeConfig.from_json(text)
    # vLLM's spellings of a draft model: with its method, or a model alone.
    for text in ('{"method": "draft_model", "model": "/m", "num_speculative_tokens": 5}',
                 '{"model": "/m", "num_speculative_tokens": 5}'):
        cfg = SpeculativeConfig.from_json(text)
        assert (cfg.method, cfg.model, cfg.num_speculative_tokens) == ("draft_model", "/m", 5) and cfg.uses_draft_model


# --------------------------------------------------------------------------- block rollback


def test_trim_frees_the_blocks_past_the_accepted_length():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    req = make_req("a", list(range(1, 7)))
    bm.allocate_slots(req, 6)
    req.num_computed_tokens = 6
    bm.commit_blocks(req)  # one full block registered
    assert bm.allocate_slots(req, 7) is not None  # room for 13 tokens: 4 blocks
    assert len(req.block_ids) == 4 and bm.num_free_blocks == 12
    kept = req.block_ids[:2]
    assert bm.trim(req, 7) == 2  # 7 tokens of valid KV: 2 blocks
    assert req.block_ids == kept and bm.num_free_blocks == 14 and bm.num_cached_blocks == 1
    assert bm.trim(req, 8) == 0


# --------------------------------------------------------------------------- runs against a verifying worker


def periodic_token(history: list[int]) -> int:
    """A fake model whose outputs fall into cycles quickly, so n-gram drafts are often right (and sometimes not)."""
    a, b = history[-1], history[-2] if len(history) > 1 else 5
    return (a * a + 3 * b + (len(history) % 7 == 0)) % VOCAB


class VerifyingWorker(FakeWorker):
    """FakeWorker's KV checks, plus verification of drafts as the real worker does it: the KV of every
    scheduled position (drafts included) is written, the drafts are accepted while they equal the model's own
    token, the token after them is sampled, and the block table and KV are rolled back past the accepted ones."""

    def execute(self, plan: StepPlan) -> StepResult:
        drafts = plan.spec_token_ids
        for req_id, d in drafts.items():
            assert plan.num_scheduled_tokens[req_id] == 1 + len(d) and req_id not in {r.req_id for r in plan.new_requests}
            self.reqs[req_id].tokens += d  # scheduled like known tokens; rolled back below
        result = super().execute(plan)
        for i, req_id in enumerate(result.req_ids):
            state = self.reqs[req_id]
            d = drafts.get(req_id, [])
            history = state.tokens[: len(state.tokens) - 1 - len(d)]  # drop the drafts and FakeWorker's token
            accepted = 0
            while accepted < len(d) and periodic_token(history) == d[accepted]:
                history.append(d[accepted])
                accepted += 1
            token = periodic_token(history)
            state.tokens = history + [token]
            result.sampled_token_ids[i] = token
            if d:
                result.num_accepted_drafts[req_id] = accepted
                state.num_computed -= len(d) - accepted
                del state.block_ids[-(-state.num_computed // self.block_size):]
                del state.kv_values[state.num_computed:]
        return result


class DraftingWorker(VerifyingWorker):
    """A worker with a draft model: it proposes the drafts a plan asks for (StepPlan.num_draft_tokens) itself,
    right for a varying number of tokens and then wrong, verifies them as VerifyingWorker does, and names them
    in the result (StepResult.draft_token_ids)."""

    def execute(self, plan: StepPlan) -> StepResult:
        assert not plan.spec_token_ids
        proposed = {}
        for req_id, n in plan.num_draft_tokens.items():
            history = list(self.reqs[req_id].tokens)
            right = len(history) % (n + 1)
            for j in range(n):
                history.append(periodic_token(history) if j < right else (periodic_token(history) + 1) % VOCAB)
            proposed[req_id] = history[-n:]
        result = super().execute(dataclasses.replace(plan, spec_token_ids=proposed))
        result.draft_token_ids = proposed
        return result


def spec_scheduler(num_blocks: int, block_size: int = 8, prefix_caching: bool = False, max_num_seqs: int = 8,
                   k: int = 3, disable: int | None = None, budget: int = 64, draft_model: str | None = None
                   ) -> Scheduler:
    method = "draft_model" if draft_model else "ngram"
    spec = SpeculativeConfig(method, num_speculative_tokens=k, prompt_lookup_min=1, prompt_lookup_max=3,
                             disable_by_batch_size=disable, model=draft_model)
    return Scheduler(SchedulerConfig(max_num_seqs, budget), CacheConfig(block_size, enable_prefix_caching=prefix_caching),
                     num_blocks, 256, speculative=spec)


def expected(prompt: list[int], max_tokens: int) -> list[int]:
    history = list(prompt)
    for _ in range(max_tokens):
        history.append(periodic_token(history))
    return history[len(prompt):]


def test_drafts_are_verified_and_outputs_match_the_model():
    sched = spec_scheduler(64)
    reqs = [make_req(f"r{i}", [3 + i, 7, 3 + i, 7, 1], max_tokens=40, ignore_eos=True) for i in range(3)]
    run = drive(sched, {0: reqs}, worker=VerifyingWorker(64, 8))
    for req in reqs:
        assert run.tokens(req.req_id) == expected(req.prompt_token_ids, 40)
    stats = sched.speculation.stats
    assert stats.num_drafts > 0 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert any(len(out.new_token_ids) > 1 for out in run.outputs["r0"])  # a step gave several tokens
    assert len(run.plans) < 3 * 40 / 2  # fewer steps than tokens


@pytest.mark.parametrize("lookahead", [1, 2])
def test_a_draft_model_proposes_in_the_worker_and_the_result_names_its_drafts(lookahead):
    sched = spec_scheduler(24, prefix_caching=True, k=4, draft_model="/draft")
    reqs = [make_req(f"r{i}", [3 + i, 7, 3 + i, 7, 1], max_tokens=40, ignore_eos=True, logprobs=1 if i == 2 else None)
            for i in range(3)]  # r2 asks for logprobs: it runs without drafts
    run = drive(sched, {0: reqs}, worker=DraftingWorker(24, 8), lookahead=lookahead)
    for req in reqs:
        assert run.tokens(req.req_id) == expected(req.prompt_token_ids, 40)
    assert any(p.num_draft_tokens for p in run.plans) and not any("r2" in p.num_draft_tokens for p in run.plans)
    assert all(p.num_scheduled_tokens[rid] == 1 + n for p in run.plans for rid, n in p.num_draft_tokens.items())
    stats = sched.speculation.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


def test_requests_that_cannot_draft_run_without_drafts_and_disable_by_batch_size():
    sched = spec_scheduler(64)
    plain = [make_req("lp", [3, 7, 3, 7, 1], max_tokens=20, ignore_eos=True, logprobs=1),
             make_req("g", [3, 7, 3, 7, 1], max_tokens=20, ignore_eos=True)]
    plain[1].grammar = 'root ::= "a"'
    run = drive(sched, {0: plain + [make_req("s", [3, 7, 3, 7, 1], max_tokens=20, ignore_eos=True)]},
                worker=VerifyingWorker(64, 8))
    assert all(set(p.spec_token_ids) <= {"s"} for p in run.plans) and any(p.spec_token_ids for p in run.plans)
    sched = spec_scheduler(64, disable=2)
    reqs = [make_req(f"r{i}", [3, 7, 3, 7, 1], max_tokens=20, ignore_eos=True) for i in range(3)]
    run = drive(sched, {0: reqs}, worker=VerifyingWorker(64, 8))
    # Three running: nothing drafted until one leaves... they all finish together, so never.
    assert not any(p.spec_token_ids for p in run.plans)
    assert all(run.tokens(r.req_id) == expected(r.prompt_token_ids, 20) for r in reqs)


def test_a_drafting_request_waits_for_its_tokens_under_async_planning():
    sched = spec_scheduler(64)
    req = make_req("a", [3, 7, 3, 7, 1], max_tokens=30, ignore_eos=True)
    run = drive(sched, {0: [req]}, worker=VerifyingWorker(64, 8), lookahead=2)
    assert run.tokens("a") == expected(req.prompt_token_ids, 30)
    # Planned ahead while its own step ran: empty plans, never a second step of it in flight.
    assert any(p.is_empty for p in run.plans) and any(p.spec_token_ids for p in run.plans)


def test_prefix_cache_registers_only_accepted_tokens():
    sched = spec_scheduler(64, prefix_caching=True)
    first = make_req("a", [3, 7, 3, 7, 1, 9, 3, 7], max_tokens=40, ignore_eos=True)
    worker = VerifyingWorker(64, 8)  # one KV pool for both runs: the second reads what the first wrote
    run = drive(sched, {0: [first]}, worker=worker)
    out = run.tokens("a")
    # A second request whose prompt is the first's whole sequence finds its blocks, all of them right.
    again = make_req("b", first.prompt_token_ids + out, max_tokens=8, ignore_eos=True)
    run = drive(sched, {0: [again]}, worker=worker)
    assert again.num_cached_tokens >= 40
    assert run.tokens("b") == expected(again.prompt_token_ids, 8)


@given(seed=st.integers(0, 2**32 - 1), num_blocks=st.integers(20, 40), prefix_caching=st.booleans(),
       lookahead=st.sampled_from([1, 2]), k=st.integers(1, 5))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_requests_with_preemption_and_aborts_produce_the_model_output(seed, num_blocks, prefix_caching,
                                                                             lookahead, k):
    rng = random.Random(seed)
    sched = spec_scheduler(num_blocks, prefix_caching=prefix_caching, k=k, max_num_seqs=6, budget=48)
    stem = [rng.randrange(1, VOCAB) for _ in range(6)]
    arrivals: dict[int, list] = {}
    reqs = []
    for i in range(12):
        prompt = (stem if rng.random() < 0.5 else []) + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 12))]
        req = make_req(f"q{i}", prompt, max_tokens=rng.randrange(1, 30), ignore_eos=True)
        reqs.append(req)
        arrivals.setdefault(rng.randrange(0, 20), []).append(req)
    aborted = {r.req_id for r in reqs if rng.random() < 0.1}
    aborts: dict[int, list[str]] = {}
    for rid in aborted:
        aborts.setdefault(rng.randrange(0, 40), []).append(rid)
    run = drive(sched, arrivals, aborts, worker=VerifyingWorker(num_blocks, 8), lookahead=lookahead)
    for req in reqs:
        tokens = run.tokens(req.req_id)
        want = expected(req.prompt_token_ids, req.sampling_params.max_tokens)
        if req.req_id in aborted:
            assert tokens == want[: len(tokens)]
        else:
            assert tokens == want and run.finish(req.req_id).finish_reason == "length"
