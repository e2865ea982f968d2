from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from .kernel_testing import assert_close  # noqa: E402
from headrace.kernels.fp8_block_matmul import (  # noqa: E402
    fp8_block_matmul,
    fp8_block_matmul_reference,
    per_token_group_quant,
    per_token_group_quant_reference,
)

# (M, N, K): one decode row, ragged M/N/K (a partial last 128-column block), several row tiles.
_CPU_CASES = [(1, 48, 256), (5, 70, 200), (33, 130, 384)]
_GPU_CASES = [(1, 6144, 4096), (7, 4096, 14336), (64, 28672, 4096), (300, 1000, 1000), (2048, 4096, 4096)]


def _weight(N: int, K: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """An e4m3 weight and per-row, per-128-column scales of very different sizes."""
    g = torch.Generator().manual_seed(N + K)
    wq = (torch.randn(N, K, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(N, -(-K // 128), generator=g) * 1e-2 + 1e-4
    return wq.to(device), scale.to(device)


def test_fp8_block_matmul(dev: tuple[torch.device, torch.dtype]) -> None:
    device, dtype = dev
    for M, N, K in _CPU_CASES if device.type == "cpu" else _GPU_CASES:
        x = (torch.randn(M, K, generator=torch.Generator().manual_seed(M)) * 3).to(dtype).to(device)
        xq, xs = per_token_group_quant_reference(x)
        wq, ws = _weight(N, K, device)
        bias = torch.randn(N, device=device).to(dtype)
        for b in (None, bias):
            assert_close(fp8_block_matmul(xq, xs, wq, ws, dtype, b), fp8_block_matmul_reference(xq, xs, wq, ws, dtype, b),
                         dtype)


def test_per_token_group_quant(dev: tuple[torch.device, torch.dtype]) -> None:
    device, _ = dev
    g = torch.Generator().manual_seed(1)
    # An outlier in one group must not flatten the rest of its row; a zero group; a ragged last group.
    x = torch.randn(3, 300, generator=g)
    x[0, 5] = 1e4
    x[1, 128:256] = 0
    x = x.to(device)
    q, s = per_token_group_quant(x)
    q_ref, s_ref = per_token_group_quant_reference(x)
    assert s.shape == (3, 3) and torch.equal(s, s_ref)
    assert float(s[0, 1]) < float(s[0, 0]) / 100
    same = q.view(torch.uint8) == q_ref.view(torch.uint8)
    if device.type == "cpu":
        # Triton's interpreter rounds to e4m3 in software with bugs the GPU's cvt does not have (no carry into the
        # exponent halves a value, ties away from even, subnormals), so there only a few elements may differ, each
        # dequantizing to within half its group's largest value; the bit-exact check is the GPU's.
        spread = s.repeat_interleave(128, dim=1)[:, :300]
        assert float((~same).float().mean()) < 0.05
        assert bool(((q.float() * spread - x).abs() <= spread * 448 / 2).all())
        return
    assert bool(same.all())
