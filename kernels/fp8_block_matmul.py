"""FP8 matmul with 128-wide K blocks of scales on both sides (the DeepSeek-V3 / Qwen3-FP8 layout that HF `fp8`
and compressed-tensors `block` checkpoints ship): y = sum over K blocks b of (xq[:, b] @ wq[:, b].T) * xs[:, b] *
ws[:, b] (+ bias).

- x is quantized per token and per 128-column group (`per_token_group_quant`: one scale per row and group, so
  an outlier costs precision in its own group only); w holds e4m3 weights with one float32 scale per output row
  and 128-column block (the loader spreads a checkpoint's [out / 128, in / 128] block scales over their rows, so
  merged q|k|v parts whose row blocks do not line up still carry their own scales).
- One program owns a [BLOCK_M, BLOCK_N] output tile and walks K one 128-column block at a time: the fp8 tensor
  core product of the block (fp32) is scaled by the row's x scale and the column's w scale and accumulated in
  fp32, so each block's product is exact before its scales, as the reference's.

Without this, block-scaled layers were multiplied by dequantizing the whole weight to 16 bits on every call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from .tile_order import grouped_tile

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
GROUP = 128  # the K block of both operands' scales
_MIN_AMAX = 1e-12


def per_token_group_quant_reference(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, ceil(K / group)]): each row's group of `group` columns
    divided by (its absolute max / 448) in float32, clamped and cast (a ragged last group scales by its own max)."""
    M, K = x.shape
    blocks = -(-K // group)
    padded = torch.zeros(M, blocks * group, dtype=torch.float32, device=x.device)
    padded[:, :K] = x.float()
    g = padded.view(M, blocks, group)
    scale = g.abs().amax(dim=-1).clamp(min=_MIN_AMAX) / FP8_MAX
    q = (g / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).view(M, -1)[:, :K].to(FP8)
    return q, scale


def fp8_block_matmul_reference(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                               out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Both operands dequantized in float32 (scales spread over their 128 columns), one float32 product, cast."""
    K = xq.shape[1]
    x = xq.float() * x_scale.repeat_interleave(GROUP, dim=1)[:, :K]
    w = wq.float() * w_scale.repeat_interleave(GROUP, dim=1)[:, :K]
    y = x @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


@triton.jit
def _group_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm,
                        GROUP: tl.constexpr, FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs = g * GROUP + tl.arange(0, GROUP)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), MIN_AMAX) / FP8_MAX
    q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
    tl.store(s_ptr + row * stride_sm + g, scale)


def per_token_group_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (unit last stride) -> (e4m3 [M, K], float32 scales [M, ceil(K / 128)]); bit-exact with the
    reference on a GPU (IEEE division, round-to-nearest-even cast)."""
    assert x.dim() == 2 and x.stride(-1) == 1, (x.shape, x.stride())
    M, K = x.shape
    blocks = triton.cdiv(K, GROUP)
    q = _utils.empty((M, K), FP8, x.device)
    scale = _utils.empty((M, blocks), torch.float32, x.device)
    if M:
        _group_quant_kernel[(M, blocks)](x, q, scale, K, x.stride(0), q.stride(0), scale.stride(0), GROUP=GROUP,
                                         FP8_MAX=FP8_MAX, MIN_AMAX=_MIN_AMAX, num_warps=1)
    return q, scale


@triton.jit(do_not_specialize=["M"])
def _fp8_block_matmul_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xsm, stride_wn, stride_wsn, stride_om,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, GROUP)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None]  # the [GROUP, BLOCK_N] transpose of w's tile
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b in range(0, tl.cdiv(K, GROUP)):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
        else:  # a ragged last block: columns past K are zero on both sides
            in_k = (b * GROUP + offs_k) < K
            a = tl.load(x_ptrs, mask=mask_m[:, None] & in_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=in_k[:, None] & mask_n[None, :], other=0.0)
        xs = tl.load(xs_ptr + rows * stride_xsm + b, mask=mask_m, other=0.0)
        ws = tl.load(ws_ptr + cols * stride_wsn + b, mask=mask_n, other=0.0)
        acc += tl.dot(a, w) * xs[:, None] * ws[None, :]
        x_ptrs += GROUP
        w_ptrs += GROUP

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def default_config(M: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): a 16-row tile for decode batches (fp8 tl.dot needs >= 16), 64
    rows up to 64, 128 for prefill; 128 columns; the K step is the 128-column scale block."""
    if M <= 16:
        return 16, 128, 4, 4
    if M <= 64:
        return 64, 128, 4, 4
    return 128, 128, 8, 3


def fp8_block_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                     out_dtype: torch.dtype, bias: torch.Tensor | None = None,
                     config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """xq e4m3 [M, K], x_scale float32 [M, ceil(K / 128)], wq e4m3 [N, K], w_scale float32 [N, ceil(K / 128)],
    bias [N] or None -> y [M, N] in out_dtype."""
    M, K = xq.shape
    N = wq.shape[0]
    blocks = triton.cdiv(K, GROUP)
    assert wq.shape[1] == K and x_scale.shape == (M, blocks) and w_scale.shape == (N, blocks), (
        xq.shape, x_scale.shape, wq.shape, w_scale.shape)
    assert xq.stride(-1) == 1 and wq.stride(-1) == 1 and x_scale.stride(-1) == 1 and w_scale.stride(-1) == 1
    y = _utils.empty((M, N), out_dtype, xq.device)
    if M == 0 or N == 0:
        return y
    block_m, block_n, warps, stages = config or default_config(M)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _fp8_block_matmul_kernel[grid](
        xq, x_scale, wq, w_scale, bias if bias is not None else y, y, M, N, K,
        xq.stride(0), x_scale.stride(0), wq.stride(0), w_scale.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=K % GROUP == 0, BLOCK_M=block_m, BLOCK_N=block_n, GROUP=GROUP,
        GROUP_M=8, num_warps=warps, num_stages=stages)
    return y
