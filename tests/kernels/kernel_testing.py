"""Comparison helpers for the kernel tests (kept out of conftest so tests can import them)."""

from __future__ import annotations

import torch


def tol(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 2e-2


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """No NaN/inf, and relative-norm error below the dtype's tolerance."""
    assert torch.isfinite(actual).all(), "kernel output has NaN/inf (unwritten element?)"
    a, e = actual.float(), expected.float()
    err = (a - e).norm() / e.norm().clamp_min(1e-6)
    assert err < tol(dtype), f"relative error {err:.3e}"
    torch.testing.assert_close(a, e, atol=tol(dtype) * 10, rtol=tol(dtype) * 10)
