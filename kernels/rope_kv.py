"""Rotary embedding (rotate-half / NeoX / HF-Llama style) fused with the paged KV-cache write.

q and k are rotated IN PLACE (and also returned); the rotated k and the raw v are written to
k_cache / v_cache [num_blocks, block_size, num_kv_heads, head_dim] at slot_mapping; slots < 0
(CUDA-graph padding) are skipped. An fp8 cache (float8_e4m3fn) stores k / k_scale and v / v_scale, saturated
at +-448 and rounded to nearest even (kernels/kv_fp8.py is the torch form).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from .kv_fp8 import is_fp8, quantize_kv


@triton.jit
def _rotate_heads(x_ptr, stride_h, n_heads, cos, sin,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate all heads of one token in place; returns the rotated halves (fp32)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < n_heads) & (offs_d[None, :] < HALF)
    p1 = x_ptr + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(p1, o1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, o2.to(x_ptr.dtype.element_ty), mask=mask)
    return o1, o2


@triton.jit
def _to_cache(x, scale, cache_ptr, KV_FP8: tl.constexpr):
    """x (float32) as the cache stores it: divided by the layer's scale and saturated for an fp8 cache. The
    division is IEEE (`div_rn`): Triton's `/` is the fast approximate one on the GPU, whose last-bit errors
    move values across e4m3 rounding boundaries, so the cache would disagree with the torch form."""
    if KV_FP8:
        x = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
    return x.to(cache_ptr.dtype.element_ty)


# The position and slot pointers are views into a step's packed metadata: no alignment specialisation.
@triton.jit(do_not_specialize=["pos_ptr", "slot_ptr"])
def _rope_and_cache_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
    num_q_heads, num_kv_heads, k_scale, v_scale,
    BLOCK_SIZE: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr, KV_FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    offs_d = tl.arange(0, BLOCK_HALF)
    cs = cos_sin_ptr + pos * stride_cs + offs_d
    cos = tl.load(cs, mask=offs_d < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cs + HALF, mask=offs_d < HALF, other=0.0).to(tl.float32)

    _rotate_heads(q_ptr + t * stride_qt, stride_qh, num_q_heads, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
    k1, k2 = _rotate_heads(k_ptr + t * stride_kt, stride_kh, num_kv_heads, cos, sin,
                           HALF, BLOCK_HKV, BLOCK_HALF)

    slot = tl.load(slot_ptr + t)
    if slot >= 0:  # slot < 0: CUDA-graph padding, nothing to cache
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        offs_h = tl.arange(0, BLOCK_HKV)
        mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < HALF)
        kc = (k_cache_ptr + blk * stride_kc_b + off * stride_kc_s
              + offs_h[:, None] * stride_kc_h + offs_d[None, :])
        if KV_FP8:  # the fp8 cache holds the rotated k as attention sees it (in q's dtype), quantized once more
            k1 = k1.to(k_ptr.dtype.element_ty).to(tl.float32)
            k2 = k2.to(k_ptr.dtype.element_ty).to(tl.float32)
        tl.store(kc, _to_cache(k1, k_scale, k_cache_ptr, KV_FP8), mask=mask)
        tl.store(kc + HALF, _to_cache(k2, k_scale, k_cache_ptr, KV_FP8), mask=mask)
        # v is copied in two halves too, so it shares the mask and tile shapes.
        vs = v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
        vc = (v_cache_ptr + blk * stride_vc_b + off * stride_vc_s
              + offs_h[:, None] * stride_vc_h + offs_d[None, :])
        if KV_FP8:
            v1 = tl.load(vs, mask=mask).to(tl.float32)
            v2 = tl.load(vs + HALF, mask=mask).to(tl.float32)
            tl.store(vc, _to_cache(v1, v_scale, v_cache_ptr, KV_FP8), mask=mask)
            tl.store(vc + HALF, _to_cache(v2, v_scale, v_cache_ptr, KV_FP8), mask=mask)
        else:
            tl.store(vc, tl.load(vs, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(vc + HALF, tl.load(vs + HALF, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)

def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: tuple[float, float] = (1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T,Hq,D] and k [T,Hkv,D] in place, write k/v into the paged caches; returns (q, k).
    kv_scale: an fp8 cache's (k, v) scales (other caches ignore them)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    assert k.shape == (T, Hkv, D) and v.shape == (T, Hkv, D) and D % 2 == 0
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert cos_sin_cache.shape[-1] == D and cos_sin_cache.stride(-1) == 1
    assert k_cache.shape[2:] == (Hkv, D) and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert positions.shape == (T,) and slot_mapping.shape == (T,)
    if T == 0:
        return q, k
    HALF = D // 2
    _rope_and_cache_kernel[(T,)](
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        Hq, Hkv, float(kv_scale[0]), float(kv_scale[1]),
        BLOCK_SIZE=k_cache.shape[1], HALF=HALF,
        BLOCK_HQ=_utils.next_pow2(Hq), BLOCK_HKV=_utils.next_pow2(Hkv), BLOCK_HALF=_utils.next_pow2(HALF),
        KV_FP8=is_fp8(k_cache.dtype), num_warps=4,
    )
    return q, k


def rope_and_cache_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: tuple[float, float] = (1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    half = q.shape[-1] // 2
    cs = cos_sin_cache[positions].float()
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float()[..., :half], x.float()[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    q.copy_(rot(q))
    k.copy_(rot(k))
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    bs = k_cache.shape[1]
    if is_fp8(k_cache.dtype):
        k_store, v_store = quantize_kv(k[keep], kv_scale[0]), quantize_kv(v[keep], kv_scale[1])
    else:
        k_store, v_store = k[keep].to(k_cache.dtype), v[keep].to(v_cache.dtype)
    k_cache[slots // bs, slots % bs] = k_store
    v_cache[slots // bs, slots % bs] = v_store
    return q, k
