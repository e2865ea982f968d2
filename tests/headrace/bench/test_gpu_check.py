"""The GPU check's bf16 verdict: judged per position, so one routing coin flip passes and a systematic error
does not."""

from __future__ import annotations

import pytest
import torch

from headrace.bench.gpu_check import bf16_verdict, check_logits, hf_model_with, per_position_rel_err


def _noisy(ref: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ref + scale * ref.norm(dim=-1, keepdim=True) / ref.shape[-1] ** 0.5 * torch.randn(ref.shape, generator=g)


def test_per_position_error_is_each_rows_relative_norm():
    ref = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    err = per_position_rel_err(ref + torch.tensor([[0.3, 0.4], [0.0, 0.0]]), ref)
    assert torch.allclose(err, torch.tensor([0.1, 0.0]))


def test_one_far_off_position_passes_a_systematic_error_and_many_flips_do_not():
    fp32 = torch.randn(32, 1000, generator=torch.Generator().manual_seed(0))
    hf_bf16 = _noisy(fp32, 0.01, 1)
    one_flip = _noisy(fp32, 0.01, 2)
    one_flip[7] = _noisy(fp32[7:8], 0.4, 3)[0]
    verdict = bf16_verdict(one_flip, hf_bf16, fp32)
    assert verdict["pass"] and verdict["positions_far_off"] == 1 and verdict["hf_bf16_positions_far_off"] == 0
    assert verdict["median_rel_err_vs_hf_fp32"] < 0.012

    assert not bf16_verdict(_noisy(fp32, 0.05, 4), hf_bf16, fp32)["pass"]  # 5x transformers' error everywhere
    many_flips = _noisy(fp32, 0.01, 5)
    many_flips[:8] = _noisy(fp32[:8], 0.4, 6)
    verdict = bf16_verdict(many_flips, hf_bf16, fp32)
    assert not verdict["pass"] and verdict["positions_far_off"] == 8


@pytest.mark.parametrize("preset", ["tiny-gemma2", "tiny-mixtral"])
def test_the_logits_check_passes_our_bf16_on_the_cpu(preset):
    """The GPU check's own path (our paged bf16 decode against transformers bf16 and fp32), on the CPU: the
    oracle takes every weight of ours (a weight left at transformers' random init fails it) and ours passes."""
    result = check_logits(preset, "torch", None, prompt_len=40, decode_steps=12, device="cpu")
    assert result["pass"] and result["hf_fp32_tokens_agree"], result
    assert result["median_rel_err_vs_hf_fp32"] < 0.02


def test_the_oracle_refuses_weights_it_would_not_take():
    from headrace.common.config import EngineConfig, ModelConfig
    from headrace.common.models.resolve import resolve_engine_config
    from headrace.services.gpu_worker.loader.model_loader import export_hf_state_dict
    from headrace.services.gpu_worker.model_runner import ModelRunner

    config = EngineConfig(model=ModelConfig(model="random:tiny-llama", dtype="float32", max_model_len=64),
                          device="cpu")
    runner = ModelRunner(resolve_engine_config(config), log=lambda *_: None)
    state = export_hf_state_dict(runner.model)
    assert hf_model_with(runner, state, torch.float32, "cpu") is not None
    state.pop("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(RuntimeError, match="missing .*up_proj"):
        hf_model_with(runner, state, torch.float32, "cpu")
