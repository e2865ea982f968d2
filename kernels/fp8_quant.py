"""Dynamic per-token FP8 (e4m3) quantization of activations: x [M, K] -> (x_fp8 [M, K], scale float32 [M, 1])
with each row's absolute maximum mapped to the fp8 maximum (448), as `torch._scaled_mm`'s rowwise scaling wants.

In torch this is four kernels (abs, amax, divide-and-clamp, cast) and two fp32 temporaries of x's size per
linear layer; an FP8 linear at decode batch sizes moves so few weight bytes that those launches were a large
part of its time (docs/benchmarks.md). Here it is one launch: one program per row reads the row twice (the
first pass finds the maximum, the second scales and casts; the row is in L2 for the second pass) and writes
the fp8 row and its scale.

Bit-exact with the torch reference: the same fp32 maximum, the same clamp, an IEEE-rounded division
(`div_rn`, not the fast approximate one) and a round-to-nearest-even cast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_MIN_AMAX = 1e-12  # an all-zero row gets a tiny scale instead of a division by zero
_BLOCK = 1024


def per_token_quant_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row divided by (its absolute max / 448) in float32, clamped to +-448 and cast to e4m3."""
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=_MIN_AMAX) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@triton.jit
def _per_token_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                            BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_row + k0 + offs, mask=(k0 + offs) < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), MIN_AMAX) / FP8_MAX
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        mask = (k0 + offs) < K
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)
        tl.store(q_row + k0 + offs, q.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def per_token_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (unit last stride) in 16 or 32 bits -> (x_fp8 [M, K] e4m3 contiguous, scale float32 [M, 1])."""
    assert x.dim() == 2 and x.stride(-1) == 1, (x.shape, x.stride())
    M, K = x.shape
    q = _utils.empty((M, K), FP8, x.device)
    scale = _utils.empty((M, 1), torch.float32, x.device)
    if M == 0:
        return q, scale
    block = max(16, min(_BLOCK, _utils.next_pow2(K)))
    _per_token_quant_kernel[(M,)](x, q, scale, K, x.stride(0), q.stride(0), BLOCK=block, FP8_MAX=FP8_MAX,
                                  MIN_AMAX=_MIN_AMAX, num_warps=4 if block >= 1024 else 1)
    return q, scale
