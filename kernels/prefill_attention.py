"""Causal paged prefill / chunked-prefill / prefix-cached attention (flash-attention style).

Paged path (k_new=None): all K/V (cached prefix and this step's tokens, already written by
rope_and_cache) is read through the block table. Grid (cdiv(max_query_len, BLOCK_Q), S, Hkv): a
program owns BLOCK_Q query tokens of one sequence times all GROUP = Hq/Hkv query heads sharing one
KV head, packed token-major into the BLOCK_M rows of each tl.dot, so every K/V tile is loaded once
per group. Online softmax in base 2 (exp2, scale pre-multiplied by log2 e).

Contiguous path (k_new, v_new given: this step's keys and values laid out like q): only the cached
prefix (positions < context_lens[s]) goes through the block table; this step's own keys are read
from k_new / v_new as plain strided tiles (one scalar base pointer advanced by BLOCK_N rows per
tile, the tile's offsets hoisted out of the loop, no block-table load, no mask on the tiles below
the diagonal). A pure prefill (context 0) never touches the block table.

Sliding window (a layer constant; NO_WINDOW for global layers): query p sees keys p - window + 1 .. p. A
program starts at the tile holding the first key any of its rows sees (loads before that key are masked
off, so blocks wholly outside the window are never read); tiles that some row's window only partly covers
are masked, tiles inside every row's window are not. Soft-capping as in the decode kernel.

An fp8 cache is read as the decode kernel reads it (widened to q's dtype, k_scale folded into the softmax
scale, v_scale into the output) and only through the paged path: this step's keys are read back from the
cache too, quantized like every other key (as the torch backend and vLLM read them), not from k_new.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from .kv_fp8 import is_fp8
from .paged_decode_attention import _gather_kv, head_dim_range, kernel_window, log2_softcap, soft_cap

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    acc, m, l, q, n0, row_pos, kv_start, kv_end, window, softcap, bt_row, k_cache_ptr, v_cache_ptr, kvh,
    qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, IDX64: tl.constexpr, SOFTCAP: tl.constexpr,
):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d, mask_d = head_dim_range(HEAD_DIM, BLOCK_D)
    if MASKED:
        mask_n = (offs_n >= kv_start) & (offs_n < kv_end)
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=mask_n, other=0)
    else:
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE)
    if IDX64:  # int64 offset math only when the cache has >= 2**31 elements
        blk = blk.to(tl.int64)
    tok = offs_n % BLOCK_SIZE
    k_ptrs = k_cache_ptr + blk[None, :] * stride_kb + tok[None, :] * stride_ks + kvh * stride_kh + offs_d[:, None]
    v_ptrs = v_cache_ptr + blk[:, None] * stride_vb + tok[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=mask_n[None, :] & mask_d[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs, mask=mask_d[:, None], other=0.0)
    k = k.to(q.dtype)  # an fp8 cache widened (exact); a no-op otherwise
    s = tl.dot(q, k) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
    if SOFTCAP:
        s = soft_cap(s, softcap)
    if MASKED:
        visible = (offs_n[None, :] <= row_pos[:, None]) & (offs_n[None, :] > row_pos[:, None] - window)
        s = tl.where(visible & mask_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    # A row with no visible key so far keeps m = -inf; use 0 as its shift so exp2 sees
    # -inf - 0 (-> 0) instead of -inf - -inf (-> NaN).
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    if MASKED:
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    else:
        v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
    v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    l = l * alpha + tl.sum(p, axis=1)
    return acc, m_new, l


@triton.jit
def _attend_new_tile(
    acc, m, l, q, k_ptrs, v_ptrs, mask_d, offs_n, q_idx, new_start, new_len, window, softcap, qk_scale,
    MASKED: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One tile of this step's keys, read from k_new / v_new; offs_n, q_idx, new_start and new_len count
    tokens from the sequence's first new token (key j is visible to query row q_idx iff
    q_idx - window < j <= q_idx; keys before new_start are not loaded)."""
    if MASKED:  # the diagonal band or the window's edge: causal and window mask, the sequence's end
        mask_n = (offs_n >= new_start) & (offs_n < new_len)
        k = tl.load(k_ptrs, mask=mask_n[None, :] & mask_d[:, None], other=0.0)
        s = tl.dot(q, k) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        if SOFTCAP:
            s = soft_cap(s, softcap)
        visible = (offs_n[None, :] <= q_idx[:, None]) & (offs_n[None, :] > q_idx[:, None] - window)
        s = tl.where(visible & mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: no NaN
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m - m_shift)
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    elif SOFTCAP:  # below every row's diagonal, inside every row's window: no mask
        k = tl.load(k_ptrs, mask=mask_d[:, None], other=0.0)
        s = soft_cap(tl.dot(q, k) * qk_scale, softcap)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
    else:  # below every row's diagonal: no mask, and every row's max is finite after this tile
        k = tl.load(k_ptrs, mask=mask_d[:, None], other=0.0)
        s = tl.dot(q, k)
        m_new = tl.maximum(m, tl.max(s, axis=1) * qk_scale)  # qk_scale > 0: max commutes with the scale
        p = tl.exp2(s * qk_scale - m_new[:, None])  # scale and shift in one FMA
        alpha = tl.exp2(m - m_new)
        v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)  # accumulate in the MMA's accumulator
    return acc, m_new, l


# Integers that vary per step (the table width) and the per-sequence metadata pointers (the backend passes
# them sliced past the decode rows, at offsets whose alignment varies per step) are not specialised on:
# each new alignment class would compile a new variant mid-serving.
@triton.jit(do_not_specialize=["stride_bt", "block_tables_ptr", "query_start_loc_ptr", "seq_lens_ptr",
                               "context_lens_ptr", "window"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, context_lens_ptr,
    k_new_ptr, v_new_ptr,
    qk_scale, v_scale, window, softcap,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_knt, stride_knh, stride_vnt, stride_vnh,
    stride_bt,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, IDX64: tl.constexpr, HAS_NEW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    # Reverse order: the last query blocks see the most keys, so start them first (tail balance).
    qblk = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    kvh = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_first = qblk * BLOCK_Q  # first query index (within the sequence) of this program
    if q_first >= q_len:
        return  # grid is sized for max_query_len; shorter sequences have idle programs
    ctx = tl.load(context_lens_ptr + seq)
    seq_len = tl.load(seq_lens_ptr + seq)
    q_last = tl.minimum(q_first + BLOCK_Q, q_len) - 1

    # Row r <-> (query token q_first + r // GROUP, head kvh * GROUP + r % GROUP).
    offs_m = tl.arange(0, BLOCK_M)
    q_idx = q_first + offs_m // GROUP
    head = kvh * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (q_idx < q_len)
    row_pos = ctx + q_idx  # absolute position: attends to keys row_pos - window + 1 .. row_pos
    offs_d, mask_d = head_dim_range(HEAD_DIM, BLOCK_D)
    tok_row = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + tok_row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & mask_d[None, :], other=0.0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq * stride_bt
    # The window's edge, in absolute key positions: key_lo is the first key any row sees, and from
    # win_full (a tile boundary) on every key is inside every row's window. Global layers: 0 and 0.
    key_lo = tl.maximum(ctx + q_first - window + 1, 0)
    win_full = tl.cdiv(tl.maximum(ctx + q_last - window + 1, 0), BLOCK_N) * BLOCK_N

    if HAS_NEW:
        # Cached prefix (positions < ctx) through the block table: every row is past all of it, so only
        # the window's edge and the last, partial tile are masked. Context 0: no iteration at all.
        ctx_end = tl.minimum(ctx, seq_len)
        ctx_full = ctx_end // BLOCK_N * BLOCK_N
        t0 = tl.minimum(key_lo // BLOCK_N * BLOCK_N, ctx_full)
        t1 = tl.maximum(t0, tl.minimum(win_full, ctx_full))
        for n0 in range(t0, t1, BLOCK_N):
            acc, m, l = _attend_tile(acc, m, l, q, n0, row_pos, key_lo, ctx_end, window, softcap, bt_row,
                                     k_cache_ptr, v_cache_ptr, kvh, qk_scale, stride_kb, stride_ks, stride_kh,
                                     stride_vb, stride_vs, stride_vh, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True,
                                     IDX64, SOFTCAP)
        for n0 in range(t1, ctx_full, BLOCK_N):
            acc, m, l = _attend_tile(acc, m, l, q, n0, row_pos, key_lo, ctx_end, window, softcap, bt_row,
                                     k_cache_ptr, v_cache_ptr, kvh, qk_scale, stride_kb, stride_ks, stride_kh,
                                     stride_vb, stride_vs, stride_vh, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, False,
                                     IDX64, SOFTCAP)
        for n0 in range(tl.maximum(ctx_full, key_lo // BLOCK_N * BLOCK_N), ctx_end, BLOCK_N):
            acc, m, l = _attend_tile(acc, m, l, q, n0, row_pos, key_lo, ctx_end, window, softcap, bt_row,
                                     k_cache_ptr, v_cache_ptr, kvh, qk_scale, stride_kb, stride_ks, stride_kh,
                                     stride_vb, stride_vs, stride_vh, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True,
                                     IDX64, SOFTCAP)
        # This step's keys, counted from the sequence's first new token (row q_start of k_new / v_new).
        # The scalar base is 64-bit and advances BLOCK_N rows per tile; the per-element offsets stay
        # within one tile (int32, loop-invariant, hoisted), so no offset can overflow on huge batches.
        new_len = tl.maximum(tl.minimum(q_len, seq_len - ctx), 0)  # keys present (seq_lens may clip)
        new_full = tl.minimum(q_first, new_len) // BLOCK_N * BLOCK_N  # tiles below every row's diagonal
        new_end = tl.minimum(new_len, q_first + BLOCK_Q)  # last key any row of this program sees, + 1
        # The window's edge counted from the first new token: tiles [j0, j1) masked, [j1, j2) not, then
        # the diagonal band; j0 <= j1 <= j2 are tile boundaries, so one pointer walks all three loops.
        new_lo = tl.maximum(q_first - window + 1, 0)
        new_win_full = tl.cdiv(tl.maximum(q_last - window + 1, 0), BLOCK_N) * BLOCK_N
        j0 = tl.minimum(new_lo // BLOCK_N * BLOCK_N, new_full)
        j1 = tl.maximum(j0, tl.minimum(new_win_full, new_full))
        k_tile = k_new_ptr + (q_start + j0).to(tl.int64) * stride_knt + kvh * stride_knh
        v_tile = v_new_ptr + (q_start + j0).to(tl.int64) * stride_vnt + kvh * stride_vnh
        offs_n = tl.arange(0, BLOCK_N)
        k_offs = offs_n[None, :] * stride_knt + offs_d[:, None]  # [HEAD_DIM, BLOCK_N]: K^T tile
        v_offs = offs_n[:, None] * stride_vnt + offs_d[None, :]  # [BLOCK_N, HEAD_DIM]
        for n0 in range(j0, j1, BLOCK_N):
            acc, m, l = _attend_new_tile(acc, m, l, q, k_tile + k_offs, v_tile + v_offs, mask_d, n0 + offs_n, q_idx,
                                         new_lo, new_len, window, softcap, qk_scale, True, SOFTCAP)
            k_tile += BLOCK_N * stride_knt
            v_tile += BLOCK_N * stride_vnt
        for n0 in range(j1, new_full, BLOCK_N):
            acc, m, l = _attend_new_tile(acc, m, l, q, k_tile + k_offs, v_tile + v_offs, mask_d, offs_n, q_idx, new_lo,
                                         new_len, window, softcap, qk_scale, False, SOFTCAP)
            k_tile += BLOCK_N * stride_knt
            v_tile += BLOCK_N * stride_vnt
        for n0 in range(new_full, new_end, BLOCK_N):
            acc, m, l = _attend_new_tile(acc, m, l, q, k_tile + k_offs, v_tile + v_offs, mask_d, n0 + offs_n, q_idx,
                                         new_lo, new_len, window, softcap, qk_scale, True, SOFTCAP)
            k_tile += BLOCK_N * stride_knt
            v_tile += BLOCK_N * stride_vnt
    else:
        # Phase 1: whole tiles below every row's causal limit: masked only at the window's edge.
        full_end = (ctx + q_first) // BLOCK_N * BLOCK_N
        t0 = key_lo // BLOCK_N * BLOCK_N
        t1 = tl.maximum(t0, tl.minimum(win_full, full_end))
        for n0 in range(t0, t1, BLOCK_N):
            acc, m, l = _attend_tile(acc, m, l, q, n0, row_pos, key_lo, seq_len, window, softcap, bt_row,
                                     k_cache_ptr, v_cache_ptr, kvh, qk_scale, stride_kb, stride_ks, stride_kh,
                                     stride_vb, stride_vs, stride_vh, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True,
                                     IDX64, SOFTCAP)
        for n0 in range(t1, full_end, BLOCK_N):
            acc, m, l = _attend_tile(acc, m, l, q, n0, row_pos, key_lo, seq_len, window, softcap, bt_row,
                                     k_cache_ptr, v_cache_ptr, kvh, qk_scale, stride_kb, stride_ks, stride_kh,
                                     stride_vb, stride_vs, stride_vh, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, False,
                                     IDX64, SOFTCAP)
        # Phase 2: the diagonal band, masked causally, to the window and against the sequence end.
        kv_end = tl.minimum(seq_len, ctx + tl.minimum(q_first + BLOCK_Q, q_len))
        for n0 in range(tl.maximum(full_end, t0), kv_end, BLOCK_N):
            acc, m, l = _attend_tile(acc, m, l, q, n0, row_pos, key_lo, kv_end, window, softcap, bt_row,
                                     k_cache_ptr, v_cache_ptr, kvh, qk_scale, stride_kb, stride_ks, stride_kh,
                                     stride_vb, stride_vs, stride_vh, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True,
                                     IDX64, SOFTCAP)

    out = acc / tl.where(l > 0, l, 1.0)[:, None] * v_scale  # fully-masked rows -> 0, not NaN
    tl.store(out_ptr + tok_row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & mask_d[None, :])


def _config(head_dim: int, max_query_len: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M rows, BLOCK_N keys, num_warps, num_stages); tuned with triton 3.6 on the paged path. The
    contiguous path (k_new / v_new) uses the same tiles until its own sweep (headrace.bench.kernels --sweep)
    says otherwise."""
    if device.type != "cuda":  # interpreter: small tiles keep the CPU tests quick
        return 32, 16, 4, 1
    if head_dim == 128 and _utils.shared_memory_per_block(device) >= 224 * 1024:
        # Hopper: 128x128 tiles over 3 stages fit its 227 KiB of shared memory and win at every length
        # (H100 sweep: 512 tokens 70 us against 124 us with 64x64 tiles; 4,096 tokens 444 us, the best).
        return 128, 128, 8, 3
    if head_dim == 128 and max_query_len >= 2048:  # long prompts: big tiles win (~+8%)
        return 128, 128, 8, 2
    if head_dim <= 128:
        return 64, 64, 4, 2
    return 64, 32, 4, 2


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    config: tuple[int, int, int, int] | None = None,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    kv_scale: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """q [T, Hq, D] (this step's tokens, sequences packed by query_start_loc [S+1]);
    caches [num_blocks, block_size, Hkv, D] already holding all seq_lens[s] tokens;
    context_lens[s] = tokens cached before this step. Returns out [T, Hq, D].
    Rows of q not covered by query_start_loc are left unwritten.
    `config` overrides (BLOCK_M, BLOCK_N, num_warps, num_stages) (tuning sweeps).
    k_new, v_new [T, Hkv, D] (optional, both or neither): this step's keys (after RoPE) and values,
    rows laid out like q. Given, keys at positions >= context_lens[s] are read from them (position p
    of sequence s is row query_start_loc[s] + p - context_lens[s]) and the caches only for the
    cached prefix; the result is the same, the loads contiguous (faster).
    `window`: query position p attends to keys p - window + 1 .. p only (None: 0 .. p); `softcap`: logits
    -> softcap * tanh(logits / softcap) before the softmax. `kv_scale`: an fp8 cache's (k, v) scales (an fp8
    cache takes no k_new / v_new: every key is read from it)."""
    T, Hq, D = q.shape
    _, block_size, Hkv, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape and Hq % Hkv == 0
    assert D >= 16, "head_dim must be >= 16"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    S = block_tables.shape[0]
    assert query_start_loc.shape == (S + 1,) and seq_lens.shape == (S,) and context_lens.shape == (S,)
    if (k_new is None) != (v_new is None):
        raise ValueError("pass both k_new and v_new, or neither")
    has_new = k_new is not None
    if has_new and is_fp8(k_cache.dtype):
        raise ValueError("an fp8 KV cache is read through the block table alone: pass no k_new / v_new")
    if has_new:
        assert k_new.shape == (T, Hkv, D) and v_new.shape == (T, Hkv, D), "k_new / v_new must be [T, Hkv, D]"
        assert k_new.dtype == k_cache.dtype and v_new.dtype == v_cache.dtype
        assert k_new.stride(-1) == 1 and v_new.stride(-1) == 1
        new_strides = (k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1))
    else:  # unused by the paged path: any valid pointer, zero strides
        k_new, v_new, new_strides = q, q, (0, 0, 0, 0)
    out = _utils.empty((T, Hq, D), q.dtype, q.device)
    if T == 0 or S == 0 or max_query_len <= 0:
        return out
    group = Hq // Hkv
    block_m, block_n, warps, stages = config or _config(D, max_query_len, q.device)
    block_m = max(block_m, _utils.next_pow2(group))  # every query head of a KV group in one tile
    block_q = block_m // group
    grid = (triton.cdiv(max_query_len, block_q), S, Hkv)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out,
        block_tables, query_start_loc, seq_lens, context_lens,
        k_new, v_new,
        scale * _LOG2E * kv_scale[0], float(kv_scale[1]), kernel_window(window), log2_softcap(softcap),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *new_strides,
        block_tables.stride(0),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, HEAD_DIM=D, BLOCK_D=_utils.next_pow2(D),
        BLOCK_SIZE=block_size, BLOCK_N=block_n, IDX64=_utils.needs_int64(k_cache, v_cache),
        HAS_NEW=has_new, SOFTCAP=bool(softcap), num_warps=warps, num_stages=stages,
    )
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    kv_scale: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    group = q.shape[1] // k_cache.shape[2]
    out = torch.zeros_like(q)
    for s in range(block_tables.shape[0]):
        a, b = int(query_start_loc[s]), int(query_start_loc[s + 1])
        n, ctx = int(seq_lens[s]), int(context_lens[s])
        if b == a:
            continue
        first = max(0, ctx - window + 1) if window else 0  # the first key any of its queries sees
        k = (_gather_kv(k_cache, block_tables[s], n, first).float() * kv_scale[0]).repeat_interleave(group, dim=1)
        v = (_gather_kv(v_cache, block_tables[s], n, first).float() * kv_scale[1]).repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,nhd->htn", q[a:b].float(), k) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        pos = ctx + torch.arange(b - a, device=q.device)
        keys = torch.arange(first, n, device=q.device)[None, :]
        visible = keys <= pos[:, None]
        if window:
            visible &= keys > pos[:, None] - window
        scores = scores.masked_fill(~visible, float("-inf"))
        out[a:b] = torch.einsum("htn,nhd->thd", scores.softmax(dim=-1), v).to(q.dtype)
    return out
