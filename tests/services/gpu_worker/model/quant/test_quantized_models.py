"""Whole quantized models (random presets quantized at load: int4 groups, online fp8): our logits through
the paged cache equal transformers' float32 forward over the same dequantized weights."""

from __future__ import annotations

import pytest
import torch

from headrace.common.config import CacheConfig, EngineConfig, ModelConfig
from headrace.services.gpu_worker.model_runner import ModelRunner
from tests.configs import resolved
from tests.services.gpu_worker.test_models_vs_hf import hf_twin, ours_and_reference


@pytest.mark.parametrize("quantization", ["gptq", "fp8"])
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_quantized_logits_match_a_float_forward_over_the_dequantized_weights(preset, quantization):
    cfg = EngineConfig(model=ModelConfig(model=f"random:{preset}", seed=5, max_model_len=512,
                                         quantization=quantization), cache=CacheConfig(num_blocks=64),
                       device="cpu")
    runner = ModelRunner(resolved(cfg), log=lambda *_: None)
    qkv = runner.model.layers[0].self_attn.qkv_proj
    assert not hasattr(qkv, "weight") if quantization == "gptq" else qkv.weight.dtype == torch.float8_e4m3fn
    hf = hf_twin(runner)
    prompt = torch.randint(0, runner.arch.vocab_size, (29,), generator=torch.Generator().manual_seed(4)).tolist()
    ours, ref = ours_and_reference(runner, hf, prompt, 8)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    dense = {n: p for n, p in hf.named_parameters() if n.endswith("q_proj.weight")}
    assert dense and all(p.dtype == torch.float32 for p in dense.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the W4A16 kernel and fp8 _scaled_mm need a GPU")
@pytest.mark.parametrize("quantization,tolerance", [("gptq", 0.02), ("fp8", 0.08)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("chunk", [16, 1])  # 1: every step one row, the batch-1 GEMV kernels
def test_gpu_kernels_match_a_float_forward_over_the_dequantized_weights(quantization, tolerance, dtype, chunk):
    """On a GPU the int4 layers run the Triton W4A16 kernel and fp8 layers quantize activations per token for
    torch._scaled_mm, so the logits differ from the float32 oracle by 16-bit rounding (and fp8 activations):
    within `tolerance` of the largest logit, with the same greedy token almost everywhere."""
    cfg = EngineConfig(model=ModelConfig(model="random:tiny-llama", seed=5, max_model_len=512, dtype=dtype,
                                         quantization=quantization), cache=CacheConfig(num_blocks=64))
    runner = ModelRunner(resolved(cfg), log=lambda *_: None)
    hf = hf_twin(runner)
    prompt = torch.randint(0, runner.arch.vocab_size, (61,), generator=torch.Generator().manual_seed(4)).tolist()
    ours, ref = ours_and_reference(runner, hf, prompt, chunk)
    assert (ours - ref).abs().max() <= tolerance * ref.abs().max()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9

