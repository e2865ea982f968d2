"""With an fp8 KV cache the triton backend's attention equals the torch oracle's over the same stored cache:
random mixed batches (decodes + chunked prefills over cached prefixes), a window and a soft-cap, scales other
than 1.0. The cache is written once by the torch backend (the interpreter's e4m3 rounding is not the GPU's:
the write is compared in tests/kernels/test_kv_fp8.py), then each backend attends over its own copy."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from headrace.kernels.kv_fp8 import FP8_KV_DTYPE, quantize_kv  # noqa: E402
from headrace.services.gpu_worker.attention.base import AttentionMetadata  # noqa: E402
from headrace.services.gpu_worker.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from headrace.services.gpu_worker.attention.triton_backend import TritonAttentionBackend  # noqa: E402

from .test_triton_backend import ATOL, DEVICE, make_batch, to_device  # noqa: E402


def attend_both(batch, scale: float, kv_scale: tuple[float, float], window=None, softcap=None):
    q, k, v, pos, cos_sin, (kc, vc), meta = batch
    q, k, v, cos_sin = to_device(q.contiguous()), to_device(k.contiguous()), to_device(v.contiguous()), \
        cos_sin.to(DEVICE)
    caches = (quantize_kv(kc.to(DEVICE), kv_scale[0]), quantize_kv(vc.to(DEVICE), kv_scale[1]))
    m = AttentionMetadata(**{f: to_device(getattr(meta, f)) for f in meta.__dataclass_fields__})
    oracle = TorchAttentionBackend(block_size=kc.shape[1])
    oracle.prepare(m)
    q, k = oracle.write_cache(q, k, v, pos.to(DEVICE), cos_sin, caches, m.slot_mapping, kv_scale)
    assert caches[0].dtype == FP8_KV_DTYPE
    want = oracle.attend(q, k, v, caches, m, scale, window, softcap, kv_scale)
    triton = TritonAttentionBackend()
    triton.prepare(m)
    got = triton.attend(q, k, v, tuple(c.clone() for c in caches), m, scale, window, softcap, kv_scale)
    return got.float().cpu(), want.float().cpu()


@pytest.mark.parametrize("kv_scale", [(1.0, 1.0), (0.1, 2.0)])
@pytest.mark.parametrize("seed", range(2))
def test_mixed_batch_fp8_matches_torch(seed: int, kv_scale: tuple[float, float]) -> None:
    g = torch.Generator().manual_seed(seed)
    shapes = [(40, 1), (3, 1), (0, 1), (0, 19), (16, 9), (33, 5)]
    batch = make_batch(shapes, 3, 8, 2, 32, 8 if seed else 16, g)
    got, want = attend_both(batch, 32 ** -0.5, kv_scale)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


def test_window_and_softcap_fp8_match_torch() -> None:
    g = torch.Generator().manual_seed(11)
    batch = make_batch([(40, 1), (30, 1), (0, 27), (25, 9)], 2, 8, 2, 32, 8, g)
    got, want = attend_both(batch, 0.2, (0.5, 0.5), window=7, softcap=1.5)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
