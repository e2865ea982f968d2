"""Checkpoint tensors of a linear layer, loaded as they are stored, each rank reading only its slice.

A quantized checkpoint stores one linear as several tensors in several layouts (GPTQ's `qweight` is
[in / 8, out], AWQ's [in, out / 8], compressed-tensors' `weight_packed` [out, in / 8], their scales one
row or column per group...). Each is declared once with a `TensorLayout` saying which dimension indexes
output features and which input features, and how many features one element along it covers (8 for a
4-bit pack, the group size for a group scale). With that, one loader serves every format: a merged
layer (q|k|v) places each part at its output offset, and a row-parallel rank reads its input range.
The formats are turned into the one layout the kernels take afterwards, in `process_after_loading`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class LinearShape:
    """A linear's features on this rank: the input range it reads, and its output parts (one per merged
    projection) as (rows here, first row of this rank's part in that projection's full weight)."""

    in_features: int  # full
    in_start: int
    in_local: int
    shards: tuple[tuple[int, int], ...]

    @property
    def out_local(self) -> int:
        return sum(rows for rows, _ in self.shards)

    def out_offset(self, shard: int) -> int:
        return sum(rows for rows, _ in self.shards[:shard])


@dataclass(frozen=True)
class TensorLayout:
    out_dim: int | None = None  # the dimension indexing output features; None: not split by output
    out_per_elem: int = 1  # output features one element along out_dim covers (a pack along the outputs)
    in_dim: int | None = None  # the dimension indexing input features; None: every rank reads all of it
    in_per_elem: int = 1  # input features one element along in_dim covers (a pack, or a group)
    per_shard: bool = False  # one element per merged part (per-tensor scales): index = the part
    # The checkpoint holds one element per `out_block` output rows, the last block possibly partial (fp8 128x128
    # block scales of a 64-row k_proj); they are loaded expanded to one element per row, so merged parts whose
    # sizes are not block multiples still line up.
    out_block: int = 0
    optional: bool = False  # absent from some checkpoints of the format


def _shape(loaded: Any) -> tuple[int, ...]:
    return tuple(loaded.get_shape()) if hasattr(loaded, "get_shape") else tuple(loaded.shape)


def _span(start: int, count: int, per: int, what: str) -> slice:
    if start % per or count % per:
        raise ValueError(f"{what}: features [{start}, {start + count}) do not fall on whole elements of {per}")
    return slice(start // per, (start + count) // per)


def new_param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
              layout: TensorLayout) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    param.tensor_layout = layout

    def weight_loader(p: nn.Parameter, loaded: Any, shard: int | None = None) -> None:
        load_slice(p, loaded, layer.shape, shard or 0, name)
        layer.quant_method.on_part_loaded(layer)

    param.weight_loader = weight_loader
    layer.register_parameter(name, param)
    return param


def load_slice(param: nn.Parameter, loaded: Any, shape: LinearShape, shard: int, name: str) -> None:
    """Copy this rank's part of one checkpoint tensor (a torch tensor or a lazy safetensors slice) into
    `param`, at the output offset of merged part `shard`."""
    layout: TensorLayout = param.tensor_layout
    rows, src_start = shape.shards[shard]
    ndim = len(_shape(loaded))
    src: list[Any] = [slice(None)] * ndim
    dst = param.data
    if layout.per_shard:
        src_tensor = _as_tensor(loaded[:] if ndim else loaded)
        dst[shard].copy_(src_tensor.reshape(()).to(dst.dtype))
        param.loaded = True
        return
    if layout.in_dim is not None and shape.in_local != shape.in_features:
        src[layout.in_dim] = _span(shape.in_start, shape.in_local, layout.in_per_elem, name)
    first_block = 0
    if layout.out_block:
        first_block = src_start // layout.out_block
        src[layout.out_dim] = slice(first_block, -(-(src_start + rows) // layout.out_block))
        dst = dst.narrow(layout.out_dim, shape.out_offset(shard), rows)
    elif layout.out_dim is not None:
        src[layout.out_dim] = _span(src_start, rows, layout.out_per_elem, name)
        span = _span(shape.out_offset(shard), rows, layout.out_per_elem, name)
        dst = dst.narrow(layout.out_dim, span.start, span.stop - span.start)
    value = _as_tensor(loaded[tuple(src)] if ndim else loaded[()])
    if layout.out_block:  # one element per row, from this part's first row
        value = value.repeat_interleave(layout.out_block, dim=layout.out_dim)
        value = value.narrow(layout.out_dim, src_start - first_block * layout.out_block, rows)
    if tuple(value.shape) != tuple(dst.shape):
        raise ValueError(f"{name}: checkpoint slice {tuple(value.shape)} does not fit {tuple(dst.shape)}")
    dst.copy_(value.to(device=dst.device, dtype=dst.dtype))
    param.loaded = True


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
