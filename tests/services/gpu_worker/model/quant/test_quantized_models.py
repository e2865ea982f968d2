"""Whole quantized models (random presets quantized at load: int4 groups, online fp8): our logits through
the paged cache equal transformers' float32 forward over the same dequantized weights."""

from __future__ import annotations

import pytest
import torch

from headrace.common.config import CacheConfig, EngineConfig, ModelConfig
from headrace.services.gpu_worker.model_runner import ModelRunner
from tests.configs import resolved
from tests.services.gpu_worker.test_models_vs_hf import hf_twin, logits_for_all_positions


@pytest.mark.parametrize("quantization", ["gptq", "fp8"])
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_quantized_logits_match_a_float_forward_over_the_dequantized_weights(preset, quantization):
    cfg = EngineConfig(model=ModelConfig(model=f"random:{preset}", seed=5, max_model_len=512,
                                         quantization=quantization), cache=CacheConfig(num_blocks=64))
    runner = ModelRunner(resolved(cfg), log=lambda *_: None)
    qkv = runner.model.layers[0].self_attn.qkv_proj
    assert not hasattr(qkv, "weight") if quantization == "gptq" else qkv.weight.dtype == torch.float8_e4m3fn
    hf = hf_twin(runner)
    prompt = torch.randint(0, runner.arch.vocab_size, (29,), generator=torch.Generator().manual_seed(4)).tolist()
    ours = logits_for_all_positions(runner, prompt, 8)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    dense = {n: p for n, p in hf.named_parameters() if n.endswith("q_proj.weight")}
    assert dense and all(p.dtype == torch.float32 for p in dense.values())
