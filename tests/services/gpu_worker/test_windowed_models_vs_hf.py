"""Sliding-window models (Mistral v0.1 style, every layer windowed) and Gemma 2 / Gemma 3 (windowed and
global layers, soft-capping, local RoPE) on tiny random configs: logits match transformers' at every prompt
position and greedy tokens equal its `generate`, with prompts longer than the window, whole and in chunks
of 5 and 1 (so chunks and decode steps cross the window's edge)."""

from __future__ import annotations

import pytest
import torch

from headrace.common.config import CacheConfig, EngineConfig, ModelConfig
from headrace.common.sampling_params import SamplingParams
from headrace.services.gpu_worker.model_runner import ModelRunner
from tests.configs import resolved
from tests.services.gpu_worker.plan_driver import PlanDriver
from tests.services.gpu_worker.test_models_vs_hf import hf_twin, ours_and_reference

PRESETS = ["tiny-mistral-sw", "tiny-gemma2", "tiny-gemma3"]
CHUNKS = [1000, 5, 1]
NEW_TOKENS = 10


@pytest.fixture(scope="module", params=PRESETS)
def runner_and_hf(request):
    cfg = EngineConfig(model=ModelConfig(model=f"random:{request.param}", seed=7, max_model_len=512),
                       cache=CacheConfig(num_blocks=64))
    runner = ModelRunner(resolved(cfg), log=lambda *_: None)
    return runner, hf_twin(runner)


def _prompt(length: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_the_tiny_configs_are_windowed_shorter_than_the_prompts(runner_and_hf):
    runner, _ = runner_and_hf
    windows = [layer.self_attn.window for layer in runner.model.layers]
    assert any(w is not None and w < 29 for w in windows), windows
    if runner.arch.model_type.startswith("gemma"):
        assert None in windows, "Gemma configs mix windowed and global layers"


@pytest.mark.parametrize("chunk", CHUNKS)
def test_logits_match_transformers(runner_and_hf, chunk):
    runner, hf = runner_and_hf
    ours, ref = ours_and_reference(runner, hf, _prompt(40, 3, runner.arch.vocab_size), chunk)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def prompts_and_generated(runner_and_hf):
    """Two prompts of different lengths (in one batch their decode rows start at different blocks) and
    transformers' greedy continuation of each."""
    runner, hf = runner_and_hf
    prompts = [_prompt(40, 5, runner.arch.vocab_size), _prompt(29, 6, runner.arch.vocab_size)]
    refs = []
    for p in prompts:
        out = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        refs.append(out[0, len(p):].tolist())
    return prompts, refs


@pytest.mark.parametrize("chunk", CHUNKS)
def test_greedy_tokens_equal_generate(runner_and_hf, prompts_and_generated, chunk):
    runner, _ = runner_and_hf
    prompts, refs = prompts_and_generated
    ours = PlanDriver(runner, chunk_size=chunk).generate(prompts, SamplingParams(temperature=0.0), NEW_TOKENS)
    assert ours == refs


def test_an_all_windowed_model_frees_blocks_behind_the_window_and_stays_exact():
    """Mistral v0.1 style (every layer windowed, window 11, blocks of 16): three requests of ~70 tokens
    (5 blocks each, 15 together) run in a pool of 9 blocks without a preemption, because the scheduler
    gives back the blocks behind the window and hands them to the others; tokens equal transformers'."""
    from headrace.engine import LLMEngine

    cfg = EngineConfig(model=ModelConfig(model="random:tiny-mistral-sw", seed=7, max_model_len=512),
                       cache=CacheConfig(num_blocks=64))
    runner = ModelRunner(resolved(cfg), log=lambda *_: None)
    assert runner.config.require_resolved().kv_window == 11
    hf = hf_twin(runner)
    engine = LLMEngine(runner.config.replace(cache=CacheConfig(num_blocks=9)), runner=runner)
    prompts = {f"r{i}": _prompt(n, 20 + i, runner.arch.vocab_size) for i, n in enumerate((40, 33, 29))}
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    for rid, p in prompts.items():
        engine.add_request(rid, p, params)
    out: dict[str, list[int]] = {rid: [] for rid in prompts}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.req_id] += o.new_token_ids
    assert engine.scheduler.num_preemptions == 0
    for rid, p in prompts.items():
        ref = hf.generate(torch.tensor([p]), max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out[rid] == ref[0, len(p):].tolist(), rid
