"""A bf16 weight prepacked once for oneDNN's CPU GEMM: the layout `F.linear` otherwise has oneDNN build from
the plain [out, in] weight on every call.

PyTorch runs a bf16 `F.linear` on CPU through oneDNN, which first reorders the weight into its blocked
layout: a pass over the whole weight per product, so a decode step reads its 270 MB of bf16 weights about
twice. Reordered once at load (what Inductor's CPU weight freezing does, through the same two operators),
a batch-16 decode step's products took 13.5 ms instead of 20.4 on two cores, and one row 6.6 instead of
16.8 (the embedded model's 121 weights, docs/benchmarks.md); results are bit for bit `F.linear`'s, at every
row count (tests/services/gpu_worker/model/quant/test_onednn_packed.py).

The packed tensor is opaque (an mkldnn tensor): it is not indexed, saved or moved, so a layer that needs
the plain weight's rows keeps that too.
"""

from __future__ import annotations

import functools

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


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """The [out, in] bf16 CPU weight in oneDNN's layout, or None where it cannot be (then use F.linear)."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), ROWS_HINT)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) for x bf16 [..., in], W prepacked by `prepack`; bf16 [..., out], as F.linear."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
