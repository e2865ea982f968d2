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


def py_hash_uniform(seed: int, step: int, v: int) -> float:
    """Pure-Python splitmix64 (unsigned arithmetic): the definition of the sampler's hash noise, which the
    torch path (services/gpu_worker/sampler.py) and the Triton kernel (kernels/sampling.py) must match."""
    m = (1 << 64) - 1
    g, m1, m2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB

    def mix(z: int) -> int:
        z &= m
        z ^= z >> 30
        z = (z * m1) & m
        z ^= z >> 27
        z = (z * m2) & m
        return z ^ (z >> 31)

    key = mix(seed + g) ^ step
    key = mix(key * m2 + g)
    return ((mix(key + (v + 1) * g) >> 41) * 2 + 1) / 2**24
