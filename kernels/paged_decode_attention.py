"""Paged decode attention (one query token per sequence), split-K "flash-decoding".

Stage 1, grid (B, Hkv, num_splits): each program owns one KV head of one sequence and one
contiguous slice of its context. All Hq/Hkv query heads that share the KV head are packed into
the rows of a single tl.dot (padded to >= 16 rows), so each K/V tile is read once per group.
It writes a normalised partial output and its log2-sum-exp into fp32 scratch.
Stage 2, grid (B, Hq): merges the splits with lse weights. Empty splits store lse = -inf and
seq_len 0 rows come out as zeros (CUDA-graph padding), never NaN.
With one split (large batches: enough programs without splitting) stage 1 writes the final output
itself: no scratch round trip and no second launch.
A sliding window (the layer's constant) moves each sequence's first key to seq_len - window: the splits
cover only the window, and nothing before it is read. Soft-capping (Gemma 2) bends the logits with
cap * tanh(logits / cap) before the softmax.
An fp8 cache (float8_e4m3fn, kernels/kv_fp8.py) is loaded as fp8 and widened to q's dtype (exact: every e4m3
value is a bf16 / fp16 value); its per-tensor scales are folded into float32 scalars: k_scale into the
softmax scale, v_scale into the final normalisation, so dequantizing costs nothing per element.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _utils

_LOG2E = 1.4426950408889634
_MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost outweighs the extra parallelism
# The window the kernels are given for a global layer: larger than any context, so every key is inside it
# (one code path, and the window stays a plain integer argument rather than a compile-time variant).
NO_WINDOW = 1 << 30


def kernel_window(window: int | None) -> int:
    if window is not None and window < 1:
        raise ValueError(f"a sliding window must be >= 1 token, got {window}")
    return window or NO_WINDOW


def log2_softcap(softcap: float | None) -> float:
    """The cap in the kernels' base-2 logit domain: cap * tanh(x / cap) scales with the logits."""
    return (softcap or 0.0) * _LOG2E


@triton.jit
def soft_cap(s, cap):
    """cap * tanh(s / cap), with tanh from exp2 (the interpreter has no libdevice): overflow gives +-1."""
    e = tl.exp2(s * (2.0 * 1.4426950408889634 / cap))
    return cap * (1.0 - 2.0 / (e + 1.0))


@triton.jit
def head_dim_range(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """(offsets 0 .. BLOCK_D - 1 along a head, which of them are inside it): BLOCK_D is HEAD_DIM rounded up to
    a power of two (tl.arange's and tl.dot's shapes; Phi-3-mini's heads are 96 wide), the rest masked off and
    loaded as zeros, which add nothing to q.k nor to p.v. A power-of-two head's mask is a constant true, which
    Triton folds away: those kernels compile as they did unmasked."""
    offs_d = tl.arange(0, BLOCK_D)
    if BLOCK_D == HEAD_DIM:
        mask_d = tl.full([BLOCK_D], 1, tl.int1)
    else:
        mask_d = offs_d < HEAD_DIM
    return offs_d, mask_d


# Integer arguments that vary from step to step (table width, split count) are not specialised on: Triton
# would otherwise compile a new variant the first time one is 1 or a multiple of 16, mid-serving. Nor are
# the metadata pointers, whose alignment depends on where a step's batch places them.
@triton.jit(do_not_specialize=["stride_bt", "num_splits", "block_tables_ptr", "seq_lens_ptr", "window"])
def _decode_stage1_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, mid_o_ptr, mid_lse_ptr, out_ptr,
    qk_scale,  # softmax scale * log2(e) (* k_scale for an fp8 cache): the softmax runs in base 2
    v_scale,  # 1.0, or an fp8 cache's v scale: the output's factor
    window,  # keys seq_len - window .. seq_len - 1 are attended (NO_WINDOW: all)
    softcap,  # the logit cap in base 2 (read when SOFTCAP)
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh, stride_ob, stride_oh,
    num_splits,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, IDX64: tl.constexpr, DIRECT: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b)
    first = tl.maximum(seq_len - window, 0)  # the first key inside the window
    # Split length rounded up to BLOCK_N so only the last tile of a split is ragged.
    per_split = tl.cdiv(tl.cdiv(seq_len - first, num_splits), BLOCK_N) * BLOCK_N
    start = first + split * per_split
    end = tl.minimum(start + per_split, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d, mask_d = head_dim_range(HEAD_DIM, BLOCK_D)
    mask_h = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + b * stride_bt
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        # Per-token gather through the block table (int64 math only for caches >= 2**31 elements).
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=mask_n, other=0)
        if IDX64:
            blk = blk.to(tl.int64)
        tok = offs_n % BLOCK_SIZE
        k = tl.load(k_cache_ptr + blk[None, :] * stride_kb + tok[None, :] * stride_ks
                    + kvh * stride_kh + offs_d[:, None], mask=mask_n[None, :] & mask_d[:, None],
                    other=0.0).to(q.dtype)
        s = tl.dot(q, k) * qk_scale  # [BLOCK_H, BLOCK_N]
        if SOFTCAP:
            s = soft_cap(s, softcap)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Every tile holds >= 1 valid key, so m_new is finite and exp2 never sees inf - inf.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        v = tl.load(v_cache_ptr + blk[:, None] * stride_vb + tok[:, None] * stride_vs
                    + kvh * stride_vh + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new

    # Empty split (start >= end): l == 0 -> store zeros and lse = -inf so stage 2 ignores it.
    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None] * v_scale
    if DIRECT:  # the only split: this is the result (a seq_len 0 row stays zeros)
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_d[None, :])
    else:
        lse = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))
        tl.store(mid_o_ptr + b * stride_mob + heads[:, None] * stride_moh + split * stride_mos + offs_d[None, :],
                 out, mask=mask_h[:, None] & mask_d[None, :])
        tl.store(mid_lse_ptr + b * stride_mlb + heads * stride_mlh + split, lse, mask=mask_h)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_stage2_kernel(
    mid_o_ptr, mid_lse_ptr, out_ptr,
    stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh, stride_ob, stride_oh,
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d, mask_d = head_dim_range(HEAD_DIM, BLOCK_D)
    mask_s = offs_s < num_splits
    lse = tl.load(mid_lse_ptr + b * stride_mlb + h * stride_mlh + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty (seq_len 0): weights become 0
    w = tl.exp2(lse - m)
    o = tl.load(mid_o_ptr + b * stride_mob + h * stride_moh + offs_s[:, None] * stride_mos + offs_d[None, :],
                mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    denom = tl.sum(w, axis=0)
    res = tl.sum(w[:, None] * o, axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty), mask=mask_d)


def _split_policy(head_dim: int) -> tuple[int, int]:
    """(stage-1 programs to aim for per SM, max splits). Small heads move few bytes per tile, so
    they need more programs in flight to saturate HBM. Sweep on H100 (triton 3.6, B=64 x 2k context):
    2 splits (1,024 programs) read at 71% of copy bandwidth, 1 split at 62%."""
    return (4, 32) if head_dim >= 128 else (4, 64)


def _config(head_dim: int, num_programs: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N keys per tile, num_warps, num_stages) for stage 1."""
    if head_dim > 128:
        return 32, 4, 2
    # Few programs (small batch): bigger tiles keep more loads in flight per program. Many
    # programs: small tiles keep occupancy up (H100 sweep at B=64 and B=256 x 2k context: 32-key tiles
    # 0.81 ms at B=256 against 0.91 ms with 64).
    if head_dim == 128 and device.type == "cuda" and num_programs <= 3 * _utils.num_sms(device):
        return 128, 4, 2
    if head_dim == 128 and device.type == "cuda":
        return 32, 4, 2
    return 64, 4, 2


def default_num_kv_splits(batch: int, num_kv_heads: int, head_dim: int, max_context: int,
                          device: torch.device) -> int:
    """Splits so stage 1 has a few programs per SM, without sub-256-token splits.

    Depends only on shapes (never on seq_lens values), so it is CUDA-graph safe.
    """
    per_sm, max_splits = _split_policy(head_dim)
    cap = max(1, min(max_splits, math.ceil(max_context / _MIN_TOKENS_PER_SPLIT)))
    if device.type != "cuda":
        return min(cap, 4)
    want = math.ceil(per_sm * _utils.num_sms(device) / max(1, batch * num_kv_heads))
    return max(1, min(cap, want))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_kv_splits: int | None = None,
    config: tuple[int, int, int] | None = None,
    window: int | None = None,
    softcap: float | None = None,
    kv_scale: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """q [B, Hq, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32;
    seq_lens [B] int32 (keys per sequence, 0 allowed). Returns out [B, Hq, D] in q.dtype.
    `config` overrides stage 1's (BLOCK_N, num_warps, num_stages) (tuning sweeps). `window`: attend to the
    last `window` keys only (None: all); `softcap`: logits -> softcap * tanh(logits / softcap); `kv_scale`: an fp8
    cache's (k, v) scales (stored element times scale is the value; other caches pass 1.0)."""
    B, Hq, D = q.shape
    _, block_size, Hkv, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape and Hq % Hkv == 0
    assert D >= 16, "head_dim must be >= 16"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert block_tables.dim() == 2 and block_tables.shape[0] == B and seq_lens.shape == (B,)
    out = _utils.empty((B, Hq, D), q.dtype, q.device)
    if B == 0:
        return out
    group = Hq // Hkv
    block_d = _utils.next_pow2(D)  # the kernels' head tile; past D masked (head_dim_range)
    if num_kv_splits is None:
        num_kv_splits = default_num_kv_splits(B, Hkv, D, block_tables.shape[1] * block_size, q.device)
    assert num_kv_splits >= 1
    direct = num_kv_splits == 1  # stage 1 writes `out` itself: no scratch, no stage 2
    if direct:
        mid_o, mid_lse = out.view(B, Hq, 1, D), out.view(B, Hq, D)  # unused by the kernel; any valid pointers
    else:
        # The split dimension is padded to a multiple of 16 so the partials' strides keep one alignment class
        # (one compiled variant) whatever the split count.
        padded = -(-num_kv_splits // 16) * 16
        mid_o = _utils.empty((B, Hq, padded, D), torch.float32, q.device)
        mid_lse = _utils.empty((B, Hq, padded), torch.float32, q.device)

    BLOCK_H = max(16, _utils.next_pow2(group))  # tl.dot needs >= 16 rows
    BLOCK_N, warps, stages = config or _config(D, B * Hkv * num_kv_splits, q.device)
    _decode_stage1_kernel[(B, Hkv, num_kv_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, mid_o, mid_lse, out,
        scale * _LOG2E * kv_scale[0], float(kv_scale[1]), kernel_window(window), log2_softcap(softcap),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        num_kv_splits,
        GROUP=group, BLOCK_H=BLOCK_H, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_N=BLOCK_N,
        IDX64=_utils.needs_int64(k_cache, v_cache), DIRECT=direct, SOFTCAP=bool(softcap),
        num_warps=warps, num_stages=stages,
    )
    if direct:
        return out
    _decode_stage2_kernel[(B, Hq)](
        mid_o, mid_lse, out,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        num_kv_splits,
        HEAD_DIM=D, BLOCK_D=block_d,
        BLOCK_S=max(_utils.next_pow2(num_kv_splits), _utils.next_pow2(_split_policy(D)[1])),
        num_warps=4 if D >= 128 else 2,
    )
    return out


def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, n: int, first: int = 0) -> torch.Tensor:
    """Tokens first .. n - 1 of one sequence from the paged cache -> [n - first, Hkv, D]."""
    bs = cache.shape[1]
    pos = torch.arange(first, n, device=cache.device)
    blocks = block_table[pos // bs].long()
    return cache[blocks, pos % bs]


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_kv_splits: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
    kv_scale: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    B, Hq, D = q.shape
    group = Hq // k_cache.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        first = max(0, n - window) if window else 0
        k = (_gather_kv(k_cache, block_tables[b], n, first).float() * kv_scale[0]).repeat_interleave(group, dim=1)
        v = (_gather_kv(v_cache, block_tables[b], n, first).float() * kv_scale[1]).repeat_interleave(group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        out[b] = torch.einsum("hn,nhd->hd", s.softmax(dim=-1), v).to(q.dtype)
    return out
