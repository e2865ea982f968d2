"""Tiny random Mixtral, Qwen2-MoE (shared expert, no renormalisation, one dense layer) and Qwen3-MoE
(QK-norm): our logits match transformers' on the same weights, and our greedy tokens equal its `generate`,
with the prompt prefilled whole, in chunks of 5 and one token a step."""

from __future__ import annotations

import pytest
import torch

from headrace.common.config import CacheConfig, EngineConfig, ModelConfig
from headrace.common.sampling_params import SamplingParams
from headrace.services.gpu_worker.model.moe import MoEBlock
from headrace.services.gpu_worker.model_runner import ModelRunner
from tests.configs import resolved
from tests.services.gpu_worker.plan_driver import PlanDriver
from tests.services.gpu_worker.test_embedded_vs_hf import assert_matches
from tests.services.gpu_worker.test_models_vs_hf import hf_twin, ours_and_reference

PRESETS = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe"]
NEW_TOKENS = 8


@pytest.fixture(scope="module", params=PRESETS)
def pair(request):
    # The oracle's terms: float32 on the CPU (a GPU's bf16 logits are checked by bench/gpu_check.py).
    cfg = EngineConfig(model=ModelConfig(model=f"random:{request.param}", seed=7, max_model_len=512),
                       cache=CacheConfig(num_blocks=64), device="cpu")
    runner = ModelRunner(resolved(cfg), log=lambda *_: None)
    return runner, hf_twin(runner)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 512, (21,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.fixture(scope="module")
def reference(pair, prompt):
    """transformers' greedy tokens and the top-2 logit gap at every step."""
    out = pair[1].generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                           pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    gaps = [float(step[0].topk(2).values[0] - step[0].topk(2).values[1]) for step in out.logits]
    return out.sequences[0, len(prompt):].tolist(), gaps


def test_moe_layers_are_where_the_config_puts_them(pair):
    runner, hf = pair
    ours = [isinstance(layer.mlp, MoEBlock) for layer in runner.model.layers]
    theirs = [hasattr(layer.mlp, "experts") for layer in hf.model.layers]
    assert ours == theirs and any(ours)
    assert (runner.arch.model_type != "qwen2_moe") or not all(ours)  # Qwen2-MoE's mlp_only_layers: one dense


@pytest.mark.parametrize("chunk", [1000, 5, 1])
def test_logits_match_transformers(pair, prompt, chunk):
    runner, hf = pair
    ours, ref = ours_and_reference(runner, hf, prompt, chunk)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1000, 5, 1])
def test_greedy_tokens_equal_generate(pair, prompt, reference, chunk):
    (ours,) = PlanDriver(pair[0], chunk_size=chunk).generate([prompt], SamplingParams(temperature=0.0), NEW_TOKENS)
    assert_matches(ours, reference, f"chunks of {chunk}")
