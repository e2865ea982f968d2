"""RMSNorm and fused residual-add + RMSNorm (one program per token row, fp32 math)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
    stride_x, stride_res, stride_out, stride_new_res,
    H, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can exceed 2**31
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the model dtype first, like the unfused `x + residual`, so the
        # residual stream and the normalised value agree bit-for-bit.
        s = (x + r).to(new_res_ptr.dtype.element_ty)
        tl.store(new_res_ptr + row * stride_new_res + offs, s, mask=mask)
        x = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    assert x.dim() == 2 and x.stride(-1) == 1, "x must be [T, H] with contiguous rows"
    T, H = x.shape
    assert weight.shape == (H,) and weight.is_contiguous()
    out = _utils.empty((T, H), x.dtype, x.device)
    new_res = _utils.empty((T, H), x.dtype, x.device) if residual is not None else out
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(-1) == 1
    if T == 0:
        return out, new_res
    BLOCK_H = _utils.next_pow2(H)
    res = residual if residual is not None else x
    _rms_norm_kernel[(T,)](
        x, res, weight, out, new_res,
        x.stride(0), res.stride(0), out.stride(0), new_res.stride(0),
        H, eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_H=BLOCK_H,
        num_warps=min(max(BLOCK_H // 256, 1), 16),
    )
    return out, new_res


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """out = x / sqrt(mean(x^2) + eps) * weight, computed in fp32, returned in x.dtype."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); inputs are not modified."""
    return _launch(x, residual, weight, eps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    new_res = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(new_res, weight, eps), new_res
