"""FP8 weight GEMV for batch-1 decode: y = x @ (w * scale[:, None]).T (+ bias), w fp8 e4m3 [N, K] row-major,
scale float32 [N] (one per output row), x [1, K] in 16 or 32 bits.

At batch 1 an FP8 linear is a stream of its 1-byte weights. cuBLAS through `torch._scaled_mm` streams them
at well under bf16's rate at M = 1 (see docs/benchmarks.md), and it needs x quantized to fp8 first (four
more kernels per layer). Here x stays in its own precision (weight-only dequantization, so batch 1 is also
the more exact path) and each weight is converted and multiplied where it is loaded:
- grid (cdiv(N, BLOCK_N), SPLIT_K): a program owns BLOCK_N rows and one K slice of whole BLOCK_K tiles;
- each loop step loads a [BLOCK_N, BLOCK_K] tile (K contiguous: BLOCK_K bytes of consecutive memory per
  row) and the matching x slice, and accumulates w * x elementwise into a [BLOCK_N, BLOCK_K] fp32 tile,
  summed over K once after the loop (no reduction inside it, no layout change of the weights);
- the row scale is applied once per row at the end; SPLIT_K > 1 stores fp32 partials that gemv.py's reduce
  kernel sums in a fixed order (deterministic, no atomics), adding the bias.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from .gemv import _gemv_reduce_kernel, store_row

_PROGRAMS = 512  # split K until the grid holds about 4 programs per SM of an H200
_MIN_TILES_PER_SPLIT = 4
_REDUCE_BLOCK = 256


@triton.jit(do_not_specialize=["tiles_per_split"])
def _fp8_gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, out_ptr,
    N, K, stride_wn, stride_os,
    tiles_per_split,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    rows = offs_n
    if IDX64:
        rows = rows.to(tl.int64)
    k_start = pid_k * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_start + tiles_per_split * BLOCK_K, K)
    w_ptrs = w_ptr + rows[:, None] * stride_wn + (k_start + offs_k)[None, :]
    x_ptrs = x_ptr + k_start + offs_k
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):  # empty for an empty split: its partial stays 0
        if EVEN_K:
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
            x = tl.load(x_ptrs)
        else:
            in_k = (k0 + offs_k) < K
            w = tl.load(w_ptrs, mask=mask_n[:, None] & in_k[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=in_k, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    out = tl.sum(acc, axis=1) * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
    store_row(out, out_ptr, b_ptr, offs_n, mask_n, pid_k, stride_os, HAS_BIAS, SPLIT)


def default_config(N: int, K: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps) from the shape only.
    - BLOCK_K = 256: 256 contiguous bytes of a weight row per tile (two 128-byte lines), 16-byte vectors.
    - BLOCK_N = 64: a 16 KiB fp8 tile; the fp32 [64, 256] accumulator is 128 registers a thread at 4 warps.
    - SPLIT_K: doubled until the grid holds about 4 programs per SM, each split keeping >= 4 tiles."""
    block_n, block_k = 64, 256
    sms = _utils.num_sms(device) if device.type == "cuda" else 4
    tiles = triton.cdiv(K, block_k)
    split = 1
    while triton.cdiv(N, block_n) * split < min(_PROGRAMS, 4 * sms) and tiles // (2 * split) >= _MIN_TILES_PER_SPLIT:
        split *= 2
    return block_n, block_k, split, 4


def fp8_gemv_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """The weight dequantized in float32, one float32 product, cast to x.dtype."""
    y = x.float() @ (weight.float() * scale.float()[:, None]).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
             config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [1, K] (unit stride), weight fp8 [N, K] (unit last stride), scale float32 [N], bias [N] or None."""
    assert x.dim() == 2 and x.shape[0] == 1 and x.stride(-1) == 1, x.shape
    N, K = weight.shape
    assert x.shape[1] == K and weight.stride(-1) == 1 and scale.shape == (N,) and scale.dtype == torch.float32
    y = _utils.empty((1, N), x.dtype, x.device)
    block_n, block_k, split, warps = config or default_config(N, K, x.device)
    tiles_per_split = triton.cdiv(triton.cdiv(K, block_k), split)
    grid = (triton.cdiv(N, block_n), split)
    common = dict(HAS_BIAS=bias is not None, EVEN_K=K % block_k == 0, IDX64=weight.numel() >= 2**31,
                  BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=2)
    b = bias if bias is not None else y
    if split == 1:
        _fp8_gemv_kernel[grid](x, weight, scale, b, y, N, K, weight.stride(0), 0, tiles_per_split,
                               SPLIT=False, **common)
        return y
    part = _utils.empty((split, 1, N), torch.float32, x.device)
    _fp8_gemv_kernel[grid](x, weight, scale, b, part, N, K, weight.stride(0), part.stride(0), tiles_per_split,
                           SPLIT=True, **common)
    _gemv_reduce_kernel[(triton.cdiv(N, _REDUCE_BLOCK), 1)](
        part, b, y, N, part.stride(0), part.stride(1), y.stride(0), split,
        HAS_BIAS=bias is not None, BLOCK_S=_utils.next_pow2(split), BLOCK=_REDUCE_BLOCK, num_warps=4,
    )
    return y
