"""A bf16 weight prepacked once for oneDNN's CPU GEMM: the layout `F.linear` otherwise has oneDNN build from
the plain [out, in] weight on every call.

PyTorch runs a bf16 `F.linear` on CPU through oneDNN, which first reorders the weight into its blocked
layout: a pass over the whole weight per product, so a decode step reads its 270 MB of bf16 weights about
twice. Reordered once at load (what Inductor's CPU weight freezing does, through the same two operators),
a batch-16 decode step's products took 13.5 ms instead of 20.4 on two cores, and one row 6.6 instead of
16.8 (the embedded model's 121 weights, docs/benchmarks.md); results are bit for bit `F.linear`'s, at every
row count (tests/services/gpu_worker/model/quant/test_onednn_packed.py).

The packed tensor is opaque (an mkldnn tensor): it is not indexed, saved or moved, so a layer that needs
the plain weight's rows keeps that too. Nor can a compiled graph take it as an input (Inductor's lowering of
the product wants the weight as a frozen constant, fake tensors have no mkldnn layout): inside
torch.compile the product is the opaque operator `headrace::onednn_linear`, which names the weight by a
handle (cpu_compiled_decode.py).
"""

from __future__ import annotations

import functools
import itertools
import weakref
from dataclasses import dataclass

import torch

# The row count the layout is chosen for (oneDNN's hint). Every row count gets the same results; 16 is
# where the packed weights serve (batched decode and prefill, gguf_weights.DENSE_FROM_ROWS and up).
ROWS_HINT = 16


@functools.cache
def available() -> bool:
    """Whether this torch build has oneDNN with bf16 GEMM on this CPU (AVX-512 BF16 / AMX, or emulated)."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A prepacked weight, and the handle a compiled graph names it by."""

    tensor: torch.Tensor  # opaque, oneDNN's layout
    out_features: int
    handle: int


# handle -> packed tensor, for the opaque operator: weak, so a dropped model's weights are freed (the layer
# holds the PackedWeight).
_BY_HANDLE: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
_NEXT_HANDLE = itertools.count()


def prepack(weight: torch.Tensor) -> PackedWeight | None:
    """The [out, in] bf16 CPU weight in oneDNN's layout, or None where it cannot be (then use F.linear)."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not available():
        return None
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), ROWS_HINT)
    handle = next(_NEXT_HANDLE)
    _BY_HANDLE[handle] = packed
    return PackedWeight(packed, weight.shape[0], handle)


def linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) for x bf16 [..., in], W prepacked by `prepack`; bf16 [..., out], as F.linear."""
    if torch.compiler.is_compiling():
        return torch.ops.headrace.onednn_linear(x, packed.handle, packed.out_features, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed.tensor, bias, "none", [], "")


_LIB = torch.library.Library("headrace", "FRAGMENT")
_LIB.define("onednn_linear(Tensor x, int handle, int out_features, Tensor? bias=None) -> Tensor")


def _onednn_linear(x: torch.Tensor, handle: int, out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, _BY_HANDLE[handle], bias, "none", [], "")


def _onednn_linear_shape(x: torch.Tensor, handle: int, out_features: int, bias: torch.Tensor | None = None
                         ) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


# Registered through the plain Library API rather than torch.library.custom_op: its autograd and
# version-counter wrappers cost ~30 us per call, as much as a small product.
_LIB.impl("onednn_linear", _onednn_linear, "CPU")
torch.library.register_fake("headrace::onednn_linear", _onednn_linear_shape, lib=_LIB)
