"""Integer weights packed into int32 words, in pure torch (no Triton: CPU workers and loaders use it).

The layout every integer-weight kernel takes: values of `bits` bits packed along the input dimension,
value k of a word in bits (k % per_word) * bits, so k = 0 is the lowest field (GPTQ's order). Loaders
unpack each checkpoint format with these and pack it again in this order.
"""

from __future__ import annotations

import torch


def unpack(packed: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 words -> their values (0 .. 2^bits - 1) as int32, expanded along `dim`: element j of a word
    comes from field j or, with `order`, from field order[j]."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    if order is not None:
        shifts = shifts[list(order)]
    words = packed.movedim(dim, -1).to(torch.int32)
    fields = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # arithmetic shift, then the mask
    return fields.reshape(*words.shape[:-1], words.shape[-1] * per).movedim(-1, dim).contiguous()


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of `unpack` (sequential fields): values 0 .. 2^bits - 1 along `dim` -> int32 words."""
    per = 32 // bits
    if values.shape[dim] % per:
        raise ValueError(f"{values.shape[dim]} values do not fill whole words of {per}")
    v = values.movedim(dim, -1).to(torch.int64)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // per, per)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)
    words = (v << shifts).sum(-1)  # fields are disjoint: the sum is their OR, < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits as a signed int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               bits: int = 4) -> torch.Tensor:
    """qweight [K / per_word, N] -> w [K, N] in scales' dtype: (q - zeros[k // G]) * scales[k // G],
    computed in float32 and rounded once."""
    q = unpack(qweight, bits, 0).float()
    if q.shape[0] != scales.shape[0] * group_size or scales.shape != zeros.shape:
        raise ValueError(f"{q.shape[0]} inputs do not match {tuple(scales.shape)} scales in groups of {group_size}")
    s = scales.float().repeat_interleave(group_size, dim=0)
    z = zeros.float().repeat_interleave(group_size, dim=0)
    return ((q - z) * s).to(scales.dtype)
