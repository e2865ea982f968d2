from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from .kernel_testing import assert_close  # noqa: E402
from headrace.kernels import _utils  # noqa: E402
from headrace.kernels.gemv import default_config, gemv, gemv_ref  # noqa: E402

# (N, K, config): small blocks on the CPU interpreter. Ragged N (not a multiple of BLOCK_N) and ragged K (not a
# multiple of BLOCK_K), no split, uneven splits (7 K tiles in 3 splits: 3 + 3 + 1) and an empty split (2 tiles
# in 3 splits of 1).
_CPU_CASES = [
    (48, 64, (16, 32, 1, 4, 2)),
    (50, 100, (16, 32, 1, 4, 3)),
    (70, 200, (16, 32, 3, 4, 2)),
    (40, 64, (32, 32, 3, 4, 2)),
    (33, 96, (16, 16, 4, 4, 3)),
]
_GPU_CASES = [
    (6144, 4096, None), (4096, 14336, None), (1000, 1000, None),
    (4096, 4096, (32, 256, 1, 4, 3)), (4096, 4096, (64, 128, 8, 8, 4)), (1000, 1000, (32, 256, 3, 4, 3)),
]


def _cases(device: torch.device) -> list:
    return _CPU_CASES if device.type == "cpu" else _GPU_CASES


def _inputs(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, row_pad: int = 0):
    x = torch.randn(M, K + row_pad, device=device).to(dtype)[:, :K]
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype)
    return x, w, b


@pytest.mark.parametrize("M", [1, 3, 8])
def test_gemv(dev: tuple[torch.device, torch.dtype], M: int) -> None:
    device, dtype = dev
    for N, K, cfg in _cases(device):
        x, w, b = _inputs(M, N, K, dtype, device)
        for bias in (None, b):
            y = gemv(x, w, bias, cfg)
            assert y.shape == (M, N) and y.dtype == dtype
            assert_close(y, gemv_ref(x, w, bias), dtype)


def test_gemv_strided_rows(dev: tuple[torch.device, torch.dtype]) -> None:
    """x a view whose row stride exceeds K (e.g. a slice of a fused activation)."""
    device, dtype = dev
    N, K = (40, 80) if device.type == "cpu" else (4096, 4096)
    x, w, b = _inputs(5, N, K, dtype, device, row_pad=48)
    assert x.stride(0) == K + 48
    for cfg in ((16, 32, 1, 4, 2), (16, 32, 2, 4, 2), None):
        assert_close(gemv(x, w, b, cfg), gemv_ref(x, w, b), dtype)


def test_gemv_m16_and_empty(dev: tuple[torch.device, torch.dtype]) -> None:
    device, dtype = dev
    x, w, b = _inputs(16, 24, 48, dtype, device)
    assert_close(gemv(x, w, b, (16, 16, 2, 4, 2)), gemv_ref(x, w, b), dtype)
    assert gemv(x[:0], w, b).shape == (0, 24)


def test_gemv_deterministic(dev: tuple[torch.device, torch.dtype]) -> None:
    device, dtype = dev
    N, K = (40, 128) if device.type == "cpu" else (4096, 14336)
    x, w, b = _inputs(3, N, K, dtype, device)
    cfg = (16, 32, 4, 4, 2) if device.type == "cpu" else None
    assert torch.equal(gemv(x, w, b, cfg), gemv(x, w, b, cfg))


def test_default_config_llama3_8b(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shape-only policy on an H100 (132 SMs) for Llama-3-8B's decode GEMMs: >= 4 programs per SM unless
    that would cut splits below 4 tiles, 512-byte tile rows, no dependence on M."""
    monkeypatch.setattr(_utils, "num_sms", lambda device: 132)
    cuda = torch.device("cuda", 0)
    want = {  # (N, K): (BLOCK_N, BLOCK_K, SPLIT_K)
        (6144, 4096): (32, 256, 4),     # QKV: 192 N-blocks x 4 = 768 programs
        (4096, 4096): (32, 256, 4),     # o_proj: 128 x 4 = 512 programs (8 splits would be 2 tiles each)
        (28672, 4096): (32, 256, 1),    # gate_up: 896 programs
        (4096, 14336): (32, 256, 8),    # down: 128 x 8 = 1024 programs of 7 tiles
        (128256, 4096): (32, 256, 1),   # LM head: 4008 programs
    }
    for (N, K), (bn, bk, split) in want.items():
        cfgs = {default_config(M, N, K, cuda, torch.bfloat16) for M in (1, 2, 7, 16)}
        assert cfgs == {(bn, bk, split, 4, 3)}, (N, K, cfgs)
        programs = -(-N // bn) * split
        assert programs >= 4 * 132 or (K // bk) // (2 * split) < 4
    assert default_config(1, 4096, 4096, cuda, torch.float32)[1] == 128  # 512 bytes of fp32
