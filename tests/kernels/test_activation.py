from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from .kernel_testing import assert_close  # noqa: E402
from headrace.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402


def test_silu_and_mul(dev: tuple[torch.device, torch.dtype]) -> None:
    device, dtype = dev
    shapes = [(1, 32), (5, 70), (3, 1500)] if device.type == "cpu" else [(1, 11008), (257, 14336), (64, 1000)]
    for T, I in shapes:
        x = (3 * torch.randn(T, 2 * I, device=device)).to(dtype)
        assert_close(silu_and_mul(x), silu_and_mul_ref(x), dtype)
