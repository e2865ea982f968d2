"""Small-M GEMV / skinny GEMM, y = x @ w.T + bias, for decode (M <= 16 rows), built to stream the weight.

At batch 1-16 a Linear layer is bound by reading its weight once: the whole design is about that stream.

Main kernel, grid (cdiv(N, BLOCK_N), SPLIT_K): each program owns BLOCK_N output columns (weight rows) and one
contiguous K slice of whole BLOCK_K tiles. Each loop step loads one [BLOCK_N, BLOCK_K] weight tile (K
contiguous: every row is BLOCK_K * elem bytes of consecutive memory, 16-byte vectors) and the matching
[16, BLOCK_K] slice of x (rows >= M masked: no memory traffic, zeros), and does one tl.dot into an fp32
[16, BLOCK_N] accumulator. Padding M to 16 rows makes the tile math a tensor-core dot, which is what Triton's
software pipeliner streams through shared memory with async copies (num_stages deep), so every weight byte is
read exactly once, coalesced, with several tiles in flight per program. x is tiny and comes from L2.
SPLIT_K == 1: the program adds the bias and stores y in x.dtype. SPLIT_K > 1: it stores fp32 partials
[SPLIT_K, 16, N] (empty splits store zeros) and a second small kernel sums them in a fixed order (deterministic,
no atomics), adds the bias and casts.

No per-call recompiles: M (the batch size) and the split count/length are not specialised on; every constexpr
is a function of (N, K, dtype) and the config only, and the partials' strides do not depend on M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _utils

MAX_M = 16  # rows of the padded dot (tl.dot needs >= 16)
_PROGRAMS_PER_SM = 4  # aim: >= 4 programs per SM over the whole grid
_MIN_TILES_PER_SPLIT = 4  # a split streams >= 4 tiles (64 KiB of bf16 weight): the pipeline prologue amortised
_TILE_ROW_BYTES = 512  # BLOCK_K * element size: 4 full 128-byte lines per weight row per tile
_REDUCE_BLOCK = 256


@triton.jit
def store_rows(acc, out_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, pid_k, stride_os, stride_om,
               HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """The epilogue of a split-K program's [rows, BLOCK_N] fp32 result: SPLIT stores it as split pid_k's
    partial (the reduce kernel adds the bias); otherwise the bias is added and y is stored in its dtype."""
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        tl.store(out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_row(out, out_ptr, b_ptr, offs_n, mask_n, pid_k, stride_os, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """store_rows for a one-row program (a [BLOCK_N] result)."""
    if SPLIT:
        tl.store(out_ptr + pid_k * stride_os + offs_n, out, mask=mask_n)
    else:
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit(do_not_specialize=["M", "tiles_per_split"])
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn,
    stride_os, stride_om,
    tiles_per_split,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_n = offs_n
    if IDX64:
        rows_n = rows_n.to(tl.int64)

    k_start = pid_k * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_start + tiles_per_split * BLOCK_K, K)
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + (k_start + offs_k)[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):  # empty for an empty split: its partial stays 0
        if EVEN_K:
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        else:
            mask_k = (k0 + offs_k) < K
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K

    store_rows(acc, out_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, pid_k, stride_os, stride_om, HAS_BIAS, SPLIT)


@triton.jit(do_not_specialize=["split_k"])
def _gemv_reduce_kernel(
    part_ptr, b_ptr, out_ptr,
    N, stride_ps, stride_pm, stride_om,
    split_k,
    HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask_n = offs_n < N
    p = tl.load(part_ptr + offs_s[:, None] * stride_ps + m * stride_pm + offs_n[None, :],
                mask=(offs_s[:, None] < split_k) & mask_n[None, :], other=0.0)
    acc = tl.sum(p, axis=0)  # a fixed reduction tree per compiled kernel: deterministic
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


def default_config(M: int, N: int, K: int, device: torch.device,
                   dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) for y[M, N] = x[M, K] @ w[N, K].T. Shape-only policy.

    - M is ignored on purpose: x is padded to 16 rows, so the weight stream is the same for every M <= 16, and
      a policy that varied with the batch size would compile a variant per batch size mid-serving.
    - BLOCK_K = 512 bytes of a weight row per tile (256 bf16): 4 whole 128-byte lines per row, 16-byte vectors.
    - BLOCK_N = 32: a 16 KiB bf16 weight tile. With 3 stages a program holds 3 x (16 KiB weight + 8 KiB padded
      x) = 72 KiB of shared memory, so 3 programs fit an H100 SM (228 KiB), i.e. up to 6 weight tiles (96 KiB)
      of reads in flight per SM: several times the ~20 KiB that ~3 TB/s x ~1 us latency / 132 SMs needs.
    - SPLIT_K: doubled while the grid has fewer than 4 programs per SM and each split keeps >= 4 tiles
      (64 KiB of bf16 weight, so the pipeline prologue and the partials' extra traffic stay small). Powers of two
      divide the Llama K's (4096 = 16 tiles, 14336 = 56 tiles) evenly. Wide layers (gate_up, LM head) need none.
    - num_warps 4: a 16 x 32 dot is one m16n8 MMA column per warp; the loads are what the warps are for.
    """
    assert 1 <= M <= MAX_M
    elem = torch.empty((), dtype=dtype).element_size()
    block_k = max(16, min(_TILE_ROW_BYTES // elem, _utils.next_pow2(K)))
    block_n = max(16, min(32, _utils.next_pow2(N)))
    sms = _utils.num_sms(device) if device.type == "cuda" else 4
    n_blocks = triton.cdiv(N, block_n)
    k_tiles = triton.cdiv(K, block_k)
    split = 1
    while n_blocks * split < _PROGRAMS_PER_SM * sms and k_tiles // (2 * split) >= _MIN_TILES_PER_SPLIT:
        split *= 2
    return block_n, block_k, split, 4, 3


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """y = x @ w.T (+ bias): x [M, K] (M <= 16, unit last stride, any row stride), w [N, K] row-major (a Linear
    weight), bias [N] or None. Returns y [M, N] (contiguous) in x.dtype; fp32 accumulation.
    `config` = (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) overrides default_config (tests, sweeps)."""
    assert x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], (x.shape, w.shape)
    assert x.stride(-1) == 1 and w.stride(-1) == 1, "x and w need a unit last stride"
    assert x.dtype == w.dtype, (x.dtype, w.dtype)
    M, K = x.shape
    N = w.shape[0]
    assert M <= MAX_M, f"gemv serves M <= {MAX_M} rows, got {M}"
    if bias is not None:
        assert bias.shape == (N,) and bias.stride(0) == 1
    y = _utils.empty((M, N), x.dtype, x.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(M, N))
    block_n, block_k, split, warps, stages = config or default_config(M, N, K, x.device, x.dtype)
    assert block_n >= 16 and block_k >= 16 and split >= 1
    k_tiles = triton.cdiv(K, block_k)
    tiles_per_split = triton.cdiv(k_tiles, split)
    common = dict(
        HAS_BIAS=bias is not None, SPLIT=split > 1, EVEN_K=K % block_k == 0, IDX64=_utils.needs_int64(w),
        BLOCK_M=MAX_M, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # tf32 is the default (ignored for 16-bit)
        num_warps=warps, num_stages=stages,
    )
    b = bias if bias is not None else y  # dummy pointer, never read
    grid = (triton.cdiv(N, block_n), split)
    if split == 1:
        _gemv_kernel[grid](x, w, b, y, M, N, K, x.stride(0), w.stride(0), 0, y.stride(0), tiles_per_split,
                           **common)
        return y
    # Partials are [split, 16, N] whatever M is: their strides depend on the shape only (one compiled variant).
    part = _utils.empty((split, MAX_M, N), torch.float32, x.device)
    _gemv_kernel[grid](x, w, b, part, M, N, K, x.stride(0), w.stride(0), part.stride(0), part.stride(1),
                       tiles_per_split, **common)
    _gemv_reduce_kernel[(triton.cdiv(N, _REDUCE_BLOCK), M)](
        part, b, y, N, part.stride(0), part.stride(1), y.stride(0), split,
        HAS_BIAS=bias is not None, BLOCK_S=_utils.next_pow2(split), BLOCK=_REDUCE_BLOCK, num_warps=4,
    )
    return y


def gemv_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)
