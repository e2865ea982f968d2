"""The FP8 KV cache through the three Triton kernels that touch it, against their torch references.

Both sides read the same fp8 cache (quantized once, by the torch reference `quantize_kv`), so the attention
kernels are compared on identical stored values; the write (rope_and_cache) is compared element-wise within
the interpreter's rounding (tests/kernels/test_fp8_quant.py: its e4m3 rounding is not the GPU's). Scales
other than 1.0 check that k_scale and v_scale are each applied once, on the right side.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton")

from headrace.kernels.kv_fp8 import FP8_KV_DTYPE, FP8_MAX, dequantize_kv, quantize_kv  # noqa: E402
from headrace.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref  # noqa: E402
from headrace.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref  # noqa: E402
from headrace.kernels.rope_kv import rope_and_cache, rope_and_cache_ref  # noqa: E402

from .kernel_testing import assert_close  # noqa: E402
from .test_rope_kv import _cos_sin_cache  # noqa: E402

MakeKV = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
SCALES = [(1.0, 1.0), (0.05, 3.0)]


def _fp8_caches(make_paged_kv: MakeKV, lens: list[int], hkv: int, d: int, bs: int, device: torch.device,
                kv_scale: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random paged caches stored as fp8 (values around the scale, so e4m3 resolution matters)."""
    k, v, tables = make_paged_kv(lens, hkv, d, bs, torch.float32, device)
    return quantize_kv(k * kv_scale[0], kv_scale[0]), quantize_kv(v * kv_scale[1], kv_scale[1]), tables


def test_quantize_kv_saturates_and_round_trips() -> None:
    x = torch.tensor([0.0, 1.0, -2.5, 1e6, -1e6, 0.3])
    q = quantize_kv(x, 0.5)
    assert q.dtype == FP8_KV_DTYPE
    back = dequantize_kv(q, 0.5)
    assert torch.equal(back[:3], x[:3]) and back[3] == FP8_MAX * 0.5 and back[4] == -FP8_MAX * 0.5
    assert abs(float(back[5]) - 0.3) <= 0.3 * 2**-4  # e4m3: 3 mantissa bits, half-ulp rounding


@pytest.mark.parametrize("kv_scale", SCALES)
@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_decode_attention_fp8(dev: tuple[torch.device, torch.dtype], make_paged_kv: MakeKV,
                              kv_scale: tuple[float, float], num_kv_splits: int) -> None:
    device, dtype = dev
    hq, hkv, d, bs = (8, 2, 64, 16) if device.type == "cpu" else (32, 8, 128, 16)
    lens = [0, 1, 17, 100] if device.type == "cpu" else [0, 1, 16, 4097, 700]
    k_cache, v_cache, tables = _fp8_caches(make_paged_kv, lens, hkv, d, bs, device, kv_scale)
    q = torch.randn(len(lens), hq, d, device=device).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, d**-0.5, num_kv_splits, kv_scale=kv_scale)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, d**-0.5, kv_scale=kv_scale)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)
    assert torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.parametrize("kv_scale", SCALES)
def test_prefill_attention_fp8(dev: tuple[torch.device, torch.dtype], make_paged_kv: MakeKV,
                               kv_scale: tuple[float, float]) -> None:
    device, dtype = dev
    hq, hkv, d, bs = (6, 2, 32, 16) if device.type == "cpu" else (32, 8, 128, 16)
    lens = [(0, 37), (20, 5), (64, 17)] if device.type == "cpu" else [(0, 2048), (1024, 513), (4000, 100)]
    seq = [c + n for c, n in lens]
    k_cache, v_cache, tables = _fp8_caches(make_paged_kv, seq, hkv, d, bs, device, kv_scale)
    qsl = torch.tensor([0] + [n for _, n in lens]).cumsum(0).to(torch.int32)
    q = torch.randn(int(qsl[-1]), hq, d, device=device).to(dtype)
    args = (q, k_cache, v_cache, tables, qsl.to(device), torch.tensor(seq, dtype=torch.int32, device=device),
            torch.tensor([c for c, _ in lens], dtype=torch.int32, device=device), max(n for _, n in lens), d**-0.5)
    out = paged_prefill_attention(*args, window=None, kv_scale=kv_scale)
    assert_close(out, paged_prefill_attention_ref(*args, kv_scale=kv_scale), dtype)
    # A window and a soft-cap go through the same fp8 loads.
    out = paged_prefill_attention(*args, window=9, softcap=5.0, kv_scale=kv_scale)
    assert_close(out, paged_prefill_attention_ref(*args, window=9, softcap=5.0, kv_scale=kv_scale), dtype)
    with pytest.raises(ValueError, match="fp8"):
        paged_prefill_attention(*args, k_new=q[:, :hkv], v_new=q[:, :hkv])


@pytest.mark.parametrize("kv_scale", SCALES)
def test_rope_and_cache_fp8(dev: tuple[torch.device, torch.dtype], kv_scale: tuple[float, float]) -> None:
    device, dtype = dev
    t, hq, hkv, d, bs = (9, 6, 2, 64, 16) if device.type == "cpu" else (300, 32, 8, 128, 16)
    num_blocks = t // bs + 4
    q = torch.randn(t, hq, d, device=device).to(dtype)
    k = (torch.randn(t, hkv, d, device=device) * kv_scale[0]).to(dtype)
    v = (torch.randn(t, hkv, d, device=device) * kv_scale[1]).to(dtype)
    k[0, 0, :2] = 1e5 * kv_scale[0]  # past e4m3's range: saturates, never NaN
    positions = torch.randint(0, 512, (t,), device=device)
    slots = torch.randperm(num_blocks * bs, device=device)[:t]
    slots[1] = -1  # padding: not written
    cache = _cos_sin_cache(512, d, device)
    k_cache = torch.zeros(num_blocks, bs, hkv, d, device=device, dtype=FP8_KV_DTYPE)
    v_cache = torch.zeros_like(k_cache)
    q2, k2, kc2, vc2 = q.clone(), k.clone(), k_cache.clone(), v_cache.clone()
    rope_and_cache_ref(q2, k2, v.clone(), positions, cache, kc2, vc2, slots, kv_scale)
    rope_and_cache(q, k, v, positions, cache, k_cache, v_cache, slots, kv_scale)
    assert_close(q, q2, dtype)
    assert_close(k, k2, dtype)
    for got, want in ((k_cache, kc2), (v_cache, vc2)):
        a, b = got.float(), want.float()
        assert bool(torch.isfinite(a).all()) and float(a.abs().max()) <= FP8_MAX
        same = a == b
        if device.type == "cpu":  # the interpreter's e4m3 rounding: a few elements off by a rounding step
            assert float((~same).float().mean()) < 0.1
            ratio = a[~same] / b[~same]
            # ... or a subnormal (below e4m3's smallest normal, 2**-6) flushed to zero
            assert bool(((ratio >= 0.5) & (ratio <= 1.2) | ((a - b)[~same].abs() < 2**-6)).all())
        else:
            assert bool(same.all())
    assert float(k_cache.float()[slots[0] // bs, slots[0] % bs, 0, 0].abs()) == FP8_MAX
    written = torch.zeros(num_blocks * bs, dtype=torch.bool)
    written[slots[slots >= 0].cpu()] = True
    assert not bool(k_cache.float().view(num_blocks * bs, -1)[~written.to(device)].any())
