from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from .kernel_testing import assert_close  # noqa: E402
from headrace.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref  # noqa: E402


def _shapes(device: torch.device) -> list[tuple[int, int]]:
    return [(1, 64), (7, 100)] if device.type == "cpu" else [(1, 4096), (257, 4096), (33, 5120)]


def test_rms_norm(dev: tuple[torch.device, torch.dtype]) -> None:
    device, dtype = dev
    for T, H in _shapes(device):
        x = torch.randn(T, H, device=device).to(dtype)
        w = (1 + 0.1 * torch.randn(H, device=device)).to(dtype)
        assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), dtype)


def test_rms_norm_strided_rows(dev: tuple[torch.device, torch.dtype]) -> None:
    device, dtype = dev
    H = 64 if device.type == "cpu" else 4096
    x = torch.randn(5, 2 * H, device=device).to(dtype)[:, :H]  # row stride != H
    w = torch.randn(H, device=device).to(dtype)
    assert_close(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), dtype)


def test_fused_add_rms_norm(dev: tuple[torch.device, torch.dtype]) -> None:
    device, dtype = dev
    for T, H in _shapes(device):
        x = torch.randn(T, H, device=device).to(dtype)
        r = torch.randn(T, H, device=device).to(dtype)
        w = (1 + 0.1 * torch.randn(H, device=device)).to(dtype)
        x0, r0 = x.clone(), r.clone()
        out, new_r = fused_add_rms_norm(x, r, w, 1e-6)
        out_ref, new_r_ref = fused_add_rms_norm_ref(x, r, w, 1e-6)
        torch.testing.assert_close(new_r, new_r_ref, atol=0, rtol=0)  # same rounding as x + r
        assert_close(out, out_ref, dtype)
        assert torch.equal(x, x0) and torch.equal(r, r0), "inputs must not be modified"


def test_empty_batch(dev: tuple[torch.device, torch.dtype]) -> None:
    device, dtype = dev
    x = torch.empty(0, 64, device=device, dtype=dtype)
    w = torch.ones(64, device=device, dtype=dtype)
    assert rms_norm(x, w, 1e-6).shape == (0, 64)
