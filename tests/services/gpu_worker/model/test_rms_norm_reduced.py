"""RMSNorm on a CPU in bf16 (the GGUF kept-quantized path's fewer-operator form) rounds once: within half a
bf16 step of the float32 formula, with the residual sum returned as computed."""

from __future__ import annotations

import torch

from headrace.services.gpu_worker.model.layers import RMSNorm


def test_bf16_rms_norm_on_cpu_is_the_float32_formula_rounded_once():
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-5, torch.bfloat16, torch.device("cpu"))
    norm.weight.data = torch.randn(64).bfloat16()
    x, residual = (torch.randn(3, 64) * 3).bfloat16(), torch.randn(3, 64).bfloat16()
    out, new_residual = norm(x, residual)
    xf = (x + residual).float()
    expected = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.float()
    assert out.dtype == torch.bfloat16 and torch.equal(new_residual, x + residual)
    half_step = expected.abs() * 2.0**-8  # half a bf16 step, plus float32 reassociation
    assert bool(((out.float() - expected).abs() <= half_step).all())
    assert torch.equal(norm(x + residual), out)  # without residual: the same
