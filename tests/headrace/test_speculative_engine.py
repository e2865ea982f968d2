"""Speculative decoding through the in-process engine on a tiny random model: the real worker verifies the
drafts (several query tokens per sequence over a cached prefix, d + 1 logits rows, KV rolled back), and
every request's output is the one it gets without speculation, greedy or seeded, through preemption and
prefix caching."""

from __future__ import annotations

import os
import random

import pytest

from headrace.common.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from headrace.common.sampling_params import SamplingParams
from headrace.engine import LLMEngine
from headrace.services.gpu_worker.model_runner import ModelRunner
from tests.configs import resolved

SPEC = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=3)


def tiny_runner(device: str = "cpu", speculative: SpeculativeConfig | None = None) -> ModelRunner:
    """The tiny random Llama these tests serve, in float32 (a draft-model config loads its draft beside it)."""
    cfg = resolved(EngineConfig(model=ModelConfig(model="random:tiny-llama", max_model_len=256, dtype="float32"),
                                cache=CacheConfig(block_size=8, num_blocks=96), device=device,
                                speculative=speculative))
    return ModelRunner(cfg, log=lambda *_: None)


@pytest.fixture(scope="module")
def runner():
    # HEADRACE_SPEC_TEST_DEVICE=cuda runs the verify steps through the GPU kernels (float32: on a GPU a verify
    # step and a decode may still round differently, so a near-tie could flip; the CPU path is exact).
    return tiny_runner(os.environ.get("HEADRACE_SPEC_TEST_DEVICE", "cpu"))


def run(runner, prompts: dict[str, list[int]], params: dict[str, SamplingParams], spec: SpeculativeConfig | None,
        num_blocks: int = 96, prefix_caching: bool = False, proposer=None) -> tuple[dict[str, list[int]], LLMEngine]:
    cfg = runner.config.replace(scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
                                cache=CacheConfig(block_size=8, num_blocks=num_blocks,
                                                  enable_prefix_caching=prefix_caching), speculative=spec)
    engine = LLMEngine(cfg, runner=runner)
    if proposer is not None:
        engine.scheduler.speculation.proposer = proposer
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, params[rid])
    out: dict[str, list[int]] = {rid: [] for rid in prompts}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.req_id] += o.new_token_ids
        for req in engine.scheduler.running:  # the worker's block tables follow the scheduler's, trims included
            state = runner.requests.get(req.req_id)
            if state is not None:
                assert state.block_table[: state.num_blocks].tolist() == req.block_ids, req.req_id
    return out, engine


def workload(seed: int) -> tuple[dict[str, list[int]], dict[str, SamplingParams]]:
    rng = random.Random(seed)
    vocab = 200
    stem = [rng.randrange(3, vocab) for _ in range(12)]
    prompts, params = {}, {}
    for i in range(6):
        body = [rng.randrange(3, vocab) for _ in range(rng.randrange(4, 20))]
        prompts[f"r{i}"] = stem + body + body[:5] if i % 2 else body * 2  # repeats for prompt lookup to find
        # Greedy outputs of a random model fall into loops: drafts are often right, and wrong where they leave.
        params[f"r{i}"] = (SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True) if i < 4 else
                           SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=48, ignore_eos=True,
                                          presence_penalty=0.5 if i == 5 else 0.0))
    params["r3"] = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=2)  # runs without drafts
    return prompts, params


@pytest.fixture(scope="module")
def plain(runner):
    """The workload's outputs without speculation."""
    prompts, params = workload(0)
    return run(runner, prompts, params, None)[0]


def test_outputs_with_speculation_are_the_outputs_without(runner, plain):
    prompts, params = workload(0)
    spec, engine = run(runner, prompts, params, SPEC)
    assert spec == plain
    stats = engine.scheduler.speculation.stats
    assert stats.num_accepted_tokens > 0 and stats.num_drafts > 0


def test_speculation_survives_preemption_and_prefix_caching(runner, plain):
    prompts, params = workload(0)
    # A pool that holds about two sequences: requests are preempted (their drafts' blocks too) and resume.
    spec, engine = run(runner, prompts, params, SPEC, num_blocks=12, prefix_caching=True)
    assert spec == plain
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.speculation.stats.num_drafts > 0


class OracleProposer:
    """Drafts that are right for a random number of tokens and then wrong (it knows each request's output
    without speculation): every verify step rejects somewhere, often across a block boundary, so the KV
    rollback and block trimming run all the time."""

    def __init__(self, prompts: dict[str, list[int]], outputs: dict[str, list[int]], seed: int = 0) -> None:
        self.known = {tuple(prompts[rid]): outputs[rid] for rid in prompts}
        self.rng = random.Random(seed)

    def propose(self, token_ids: list[int], max_drafts: int | None = None) -> list[int]:
        k = min(4, max_drafts if max_drafts is not None else 4)
        for prompt, output in self.known.items():
            if tuple(token_ids[: len(prompt)]) == prompt:
                done = len(token_ids) - len(prompt)
                right = self.rng.randrange(0, k + 1)
                return (output[done: done + right] + [7] * k)[:k]
        raise AssertionError("a request the oracle does not know")


def test_rejected_drafts_roll_back_the_kv_and_blocks(runner, plain):
    prompts, params = workload(0)
    greedy = {rid: prompts[rid] for rid in ("r0", "r1", "r2")}
    oracle = OracleProposer(greedy, plain)
    spec, engine = run(runner, greedy, params, SPEC, num_blocks=20, prefix_caching=True, proposer=oracle)
    assert spec == {rid: plain[rid] for rid in greedy}
    stats = engine.scheduler.speculation.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
