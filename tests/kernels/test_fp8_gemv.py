from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from .kernel_testing import assert_close  # noqa: E402
from headrace.kernels import _utils  # noqa: E402
from headrace.kernels.fp8_gemv import default_config, fp8_gemv, fp8_gemv_reference  # noqa: E402

# (N, K, config): ragged N and K, no split, uneven splits (7 K tiles in 3 splits: 3 + 3 + 1) and an empty split.
_CPU_CASES = [(48, 64, (16, 32, 1, 4)), (50, 100, (16, 32, 1, 4)), (70, 224, (16, 32, 3, 4)), (40, 64, (32, 32, 3, 4))]
_GPU_CASES = [(6144, 4096, None), (4096, 14336, None), (1000, 1000, None), (28672, 4096, None),
              (4096, 4096, (32, 128, 1, 4))]


def _inputs(N: int, K: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(N * 31 + K)
    w = torch.randn(N, K, generator=g)
    scale = w.abs().amax(1) / 448
    fp8 = (w / scale[:, None]).to(torch.float8_e4m3fn).to(device)
    x = torch.randn(1, K, generator=g).to(dtype).to(device)
    return x, fp8, scale.to(device), (torch.randn(N, generator=g) * 0.1).to(dtype).to(device)


def test_fp8_gemv(dev: tuple[torch.device, torch.dtype]) -> None:
    device, dtype = dev
    for N, K, cfg in _CPU_CASES if device.type == "cpu" else _GPU_CASES:
        x, w, scale, bias = _inputs(N, K, dtype, device)
        for b in (None, bias):
            assert_close(fp8_gemv(x, w, scale, b, cfg), fp8_gemv_reference(x, w, scale, b), dtype)


def test_default_config_fills_an_h200(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_utils, "num_sms", lambda device: 132)
    cuda = torch.device("cuda", 0)
    splits = {(n, k): default_config(n, k, cuda)[2] for n, k in ((6144, 4096), (4096, 4096), (28672, 4096),
                                                                 (4096, 14336))}
    assert splits == {(6144, 4096): 4, (4096, 4096): 4, (28672, 4096): 2, (4096, 14336): 8}, splits
