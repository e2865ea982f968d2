"""Quantized checkpoints written by the real tools (llm-compressor / compressed-tensors, GPTQModel,
AutoAWQ; `scripts/make_quant_fixtures.py` made them): the format is detected from config.json, every
quantized linear dequantizes to exactly what the tool's own dequantization gives (the fixture's
oracle.st, stored in the dtype the tool computes it in), and the whole model runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from headrace.common.config import CacheConfig, EngineConfig, ModelConfig
from headrace.services.gpu_worker.loader.model_loader import export_hf_state_dict
from headrace.services.gpu_worker.model_runner import ModelRunner
from tests.configs import resolved
from tests.services.gpu_worker.test_models_vs_hf import hf_twin, ours_and_reference

FIXTURES = Path(__file__).parents[3] / "fixtures" / "quant"
FOLDERS = sorted(p.name for p in FIXTURES.iterdir() if (p / "oracle.st").exists())
EXPECTED = {  # folder prefix -> (kind, checkpoint format) the resolution must find
    "ct-w": ("int", "compressed-tensors"), "ct-fp8": ("fp8", "compressed-tensors"),
    "gptq-": ("int", "gptq"), "awq-": ("int", "awq"),
}


def runner_for(folder: str) -> ModelRunner:
    cfg = EngineConfig(model=ModelConfig(model=str(FIXTURES / folder), dtype="float32", max_model_len=256),
                       cache=CacheConfig(num_blocks=32), device="cpu")
    return ModelRunner(resolved(cfg), log=lambda *_: None)


def test_the_fixtures_cover_every_checkpoint_format():
    assert {prefix for prefix in EXPECTED for f in FOLDERS if f.startswith(prefix)} == set(EXPECTED), FOLDERS
    assert json.loads((FIXTURES / "fixtures.json").read_text())["fixtures"]


@pytest.mark.parametrize("folder", FOLDERS)
def test_dequantized_weights_equal_the_tools_own(folder):
    runner = runner_for(folder)
    spec = runner.config.resolved.quantization
    kind, fmt = next(v for prefix, v in EXPECTED.items() if folder.startswith(prefix))
    assert (spec.kind, spec.checkpoint_format) == (kind, fmt)
    ours = export_hf_state_dict(runner.model)
    oracle = load_file(str(FIXTURES / folder / "oracle.st"))
    assert oracle
    for name, want in oracle.items():
        got = ours[name]
        assert got.shape == want.shape, name
        # The tools round the exact product (q - zero) * scale once, to their dtype; ours keeps it exact
        # in float32, so rounding it the same way must give the same bits.
        assert torch.equal(got.to(want.dtype), want), (name, (got.to(want.dtype).float() - want.float()).abs().max())


@pytest.mark.parametrize("folder", FOLDERS)
def test_the_quantized_model_runs_as_its_dequantized_twin(folder):
    runner = runner_for(folder)
    hf = hf_twin(runner)
    prompt = torch.randint(3, runner.arch.vocab_size, (19,), generator=torch.Generator().manual_seed(1)).tolist()
    ours, ref = ours_and_reference(runner, hf, prompt, 7)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)



def _fp8_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """What the GPU path computes, in float32: x quantized as it quantizes it (per token, or per token and 128
    columns for block scales), both operands dequantized, one float32 product."""
    from headrace.kernels.fp8_block_matmul import fp8_block_matmul_reference, per_token_group_quant_reference
    from headrace.kernels.fp8_quant import per_token_quant_reference

    if layer.weight_scale.dim() == 2:
        xq, xs = per_token_group_quant_reference(x)
        return fp8_block_matmul_reference(xq, xs, layer.weight, layer.weight_scale, torch.float32)
    if x.shape[0] == 1:  # batch-1 GEMV: x is not quantized
        return x.float() @ (layer.weight.float() * layer.weight_scale[:, None]).t()
    xq, xs = per_token_quant_reference(x)
    return (xq.float() * xs) @ (layer.weight.float() * layer.weight_scale[:, None]).t()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp8 GPU kernels need a GPU")
@pytest.mark.parametrize("folder", [f for f in FOLDERS if f.startswith("ct-fp8")])
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_fp8_checkpoint_layers_on_the_gpu_kernels(folder, rows):
    """On a GPU, 128x128-block layers run kernels/fp8_block_matmul.py and channel layers fp8_gemv (one row) or
    _scaled_mm: every layer of the real checkpoint equals the float32 product over the same quantized operands
    within bf16 rounding. (Against the float32 twin with unquantized activations a 1-layer random model differs
    by up to ~13% of its largest logit: that is fp8 activations, not the kernels.)"""
    cfg = EngineConfig(model=ModelConfig(model=str(FIXTURES / folder), dtype="bfloat16", max_model_len=256),
                       cache=CacheConfig(num_blocks=32))
    runner = ModelRunner(resolved(cfg), log=lambda *_: None)
    layers = [m for m in runner.model.modules() if getattr(m, "weight", None) is not None
              and m.weight.dtype == torch.float8_e4m3fn]
    assert layers
    for layer in layers:
        x = torch.randn(rows, layer.weight.shape[1], device=layer.weight.device, generator=None).to(torch.bfloat16)
        got = layer.quant_method.apply(layer, x, None).float()
        want = _fp8_reference(layer, x)
        torch.testing.assert_close(got, want, atol=2e-2 * float(want.abs().max()), rtol=1e-2)
