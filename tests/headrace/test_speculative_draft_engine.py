"""Speculative decoding with a draft model through the in-process engine on tiny random models: the worker's
draft model proposes at the start of each verify step into the target's block tables, the drafts are verified
against the draft's q, and outputs are those without speculation where they must be: a draft identical to the
target accepts everything and changes nothing (greedy or seeded, through preemption and prefix caching); a
different draft is often rejected and greedy outputs still do not change."""

from __future__ import annotations

import pytest

from headrace.common.config import SpeculativeConfig
from headrace.services.gpu_worker.model_runner import ModelRunner
from tests.headrace.test_speculative_engine import run, tiny_runner, workload


def draft_spec(model: str) -> SpeculativeConfig:
    return SpeculativeConfig(method="draft_model", model=model, num_speculative_tokens=4)


def make_runner(draft: str) -> ModelRunner:
    return tiny_runner(speculative=draft_spec(draft))


@pytest.fixture(scope="module")
def self_runner():
    """The target with itself as the draft (the same preset and seed: the same weights)."""
    return make_runner("random:tiny-llama")


@pytest.fixture(scope="module")
def plain(self_runner):
    prompts, params = workload(0)
    return run(self_runner, prompts, params, None)[0]


def test_a_draft_identical_to_the_target_accepts_every_draft_and_changes_nothing(self_runner, plain):
    prompts, params = workload(0)
    # A pool of about two sequences: requests are preempted and resume with a draft KV they recompute, and
    # prefix-cache hits (whose draft KV nothing wrote) are recomputed by the draft too.
    spec, engine = run(self_runner, prompts, params, draft_spec("random:tiny-llama"), num_blocks=12,
                       prefix_caching=True)
    assert spec == plain  # seeded requests too: the draft draws with the sampler's own noise
    stats = engine.scheduler.speculation.stats
    assert engine.scheduler.num_preemptions > 0 and stats.num_drafts > 0
    assert stats.num_accepted_tokens == stats.num_draft_tokens


def test_a_different_draft_is_often_rejected_and_greedy_outputs_do_not_change(plain):
    runner = make_runner("random:tiny-mistral")
    prompts, params = workload(0)
    spec, engine = run(runner, prompts, params, draft_spec("random:tiny-mistral"))
    greedy = [rid for rid in prompts if params[rid].temperature == 0.0]
    assert {rid: spec[rid] for rid in greedy} == {rid: plain[rid] for rid in greedy}
    stats = engine.scheduler.speculation.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    # Sampled requests follow the target's distribution (tests/services/gpu_worker/test_rejection_sampler_draft)
    # and stay reproducible: the same run again gives the same tokens.
    sampled = {rid: prompts[rid] for rid in prompts if rid not in greedy}
    assert run(runner, sampled, params, draft_spec("random:tiny-mistral"))[0] == {rid: spec[rid] for rid in sampled}
