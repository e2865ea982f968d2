"""GGUF weights kept quantized on CPU: the converter's affine groups (codes, scales and mins per 16 weights,
common/models/gguf_blocks.py) repacked at load for PyTorch's CPU int4 weight-only GEMM
(`aten._weight_int4pack_mm_for_cpu`, the operator gpt-fast and torchao use), with bf16 activations: the one
fast path of that operator (float32 activations take a reference loop ~40x slower, measured here). The rest
of the model keeps its dtype (float32 by default: residual stream, norms, attention and KV cache), and each
product casts its input to bf16 and its output back.

That kernel computes w = (q - 8) * scale + zero per group of 32 inputs, q a 4-bit code, scale and zero in the
activations' dtype. The formats fold into it:
- 4-bit codes in groups of 32 (Q4_0, Q4_1, Q4_K): one packed weight; scale = s, zero = min + 8 s.
- 8-bit codes in groups of 32 (Q8_0): code = 16 hi + lo, two packed weights summed: hi with scale 16 s and
  zero 0, lo with scale s and zero min + 136 s; together they read one byte per weight.
- anything else (Q6_K's 16-weight groups, a merged layer mixing Q6_K with a 4-bit format, or an output size
  the kernel cannot tile): dequantized once at load into a dense weight of the model's dtype.
The integers are kept exactly; scale and zero are rounded to the activations' dtype (bf16 keeps 8 bits of
the fp16 scales), so the products differ from a float32 forward in the last bits (docs/cpu.md).

The int4 kernel streams a quarter of bf16's bytes, which wins at one row, but it does not amortise its
unpacking over rows: at 16 rows it is 2-4x slower than oneDNN's bf16 GEMM on the same shapes
(scripts/probe_cpu_qmm.py, docs/benchmarks.md). So each int4 layer also holds its weight dequantized once
(exact float32, rounded to bf16 once, prepacked for oneDNN) for products of `DENSE_FROM_ROWS` rows or more:
batched decode steps and prefill. Together 2.5 bytes per weight, still less than the float path's 4 (the LM
head also keeps its plain copy, whose rows refine_near_max reads; tied, that is the embedding table).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from headrace.common.models.gguf_blocks import GROUP
from headrace.services.gpu_worker.model.quant import onednn_packed
from headrace.services.gpu_worker.model.quant.base import LinearMethod
from headrace.services.gpu_worker.model.quant.params import LinearShape, TensorLayout, new_param

KERNEL_GROUP = 32  # the int4 kernel's group of inputs (it takes 32, 64, 128 or 256)
INNER_K_TILES = 2  # how the CPU packing interleaves K; any of 1, 2, 4, 8 gives the same products
ACT_DTYPE = torch.bfloat16
# From this many rows a product runs on the dense bf16 copy (prepacked for oneDNN, onednn_packed.py) instead
# of the int4 kernel. Whole decode steps of the embedded model, same process, the two rules alternating
# (2 threads, min / median ms per step): 4 rows int4 13.4 / 16.0 against dense 19.3 / 20.4; 8 rows 21.6 /
# 26.2 against 22.7 / 28.0 (even); 10 rows 31.6 / 34.2 against 24.7 / 27.8 (docs/benchmarks.md). Before
# the prepacking (F.linear reordering each weight per product) the crossover was 12 rows.
DENSE_FROM_ROWS = 10
# A logit within this fraction of its row's largest is recomputed in float32 by `refine_near_max`. Beside
# the bf16 output's half step (2^-9 relative), the kernel's bf16 scales and zeros move a logit: on the
# embedded model's head (Q8_0, two parts) the top logits were off by up to 0.9% of the max, and the float32
# argmax lay up to 0.64% below the rough max (8 x 64 greedy positions); 2^-6 leaves room over that, at
# 1.2 candidates per row on average there.
NEAR_MAX = 2.0**-6
_CODES = TensorLayout(out_dim=0, in_dim=1)
_GROUPS = TensorLayout(out_dim=0, in_dim=1, in_per_elem=GROUP)


class GGUFLinear(LinearMethod):
    def __init__(self, act_dtype: torch.dtype = ACT_DTYPE, keeps_rows: bool = False):
        self.act_dtype = act_dtype  # float32 only for exactness tests: the kernel's slow reference path
        # The LM head reads rows of its plain dense copy (refine_near_max); other layers keep only the copy
        # prepacked for oneDNN where there is one (onednn_packed.py): 2 bytes per weight, not 4.
        self.keeps_rows = keeps_rows

    def create_weights(self, layer: nn.Module, shape: LinearShape, dtype: torch.dtype, device: torch.device) -> None:
        if shape.in_local % GROUP:
            raise ValueError(f"GGUF groups of {GROUP} do not divide this rank's {shape.in_local} input features")
        new_param(layer, "codes", (shape.out_local, shape.in_local), torch.uint8, device, _CODES)
        for name in ("scales", "mins"):
            new_param(layer, name, (shape.out_local, shape.in_local // GROUP), torch.float32, device, _GROUPS)

    def process_after_loading(self, layer: nn.Module) -> None:
        codes, scales, mins = layer.codes.data, layer.scales.data, layer.mins.data
        del layer.codes, layer.scales, layer.mins
        layer.int4_parts = int4_parts(codes, scales, mins, self.act_dtype)
        for i, (packed, scale_zero) in enumerate(layer.int4_parts or ()):  # buffers: counted, moved, saved
            layer.register_buffer(f"int4_packed_{i}", packed)
            layer.register_buffer(f"int4_scale_zero_{i}", scale_zero)
        layer.dense = layer.batched_dense = layer.batched_packed = None
        w = codes.float() * scales.repeat_interleave(GROUP, 1) + mins.repeat_interleave(GROUP, 1)
        if layer.int4_parts is None:  # not representable in the kernel's layout: a dense weight
            layer.dense = nn.Parameter(w.to(layer.params_dtype), requires_grad=False)
            return
        # Neither is a buffer: a single-row step reads neither (bench roofline counts the int4 bytes).
        layer.batched_dense = w.to(self.act_dtype)
        layer.batched_packed = onednn_packed.prepack(layer.batched_dense)
        if layer.batched_packed is not None and not self.keeps_rows:
            layer.batched_dense = None

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.dense is not None:
            return F.linear(x, layer.dense, bias)
        if uses_dense(x.numel() // x.shape[-1]):
            if layer.batched_packed is not None:
                y = onednn_packed.linear(x.to(self.act_dtype), layer.batched_packed).to(x.dtype)
            else:
                y = F.linear(x.to(self.act_dtype), layer.batched_dense).to(x.dtype)
            return y if bias is None else y + bias
        return int4_matmul(x, layer.int4_parts, bias)

    def refine_near_max(self, layer: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """float32 logits (bf16 values from the product above) with every entry near its row's max recomputed
        in float32 from the dense copy, in place: the greedy token is the float32 product's. Both operators
        return bf16, whose 8 bits put logits of 10-30 a step of 1/16-1/8 apart, so near-ties were decided by
        rounding; this alone took the greedy agreement with a float32 forward from 97.1% to 98% (docs/cpu.md).
        Costs a few small operators per step, and a dot product per candidate (usually a handful)."""
        w = layer.dense if layer.dense is not None else layer.batched_dense
        if w.dtype == torch.float32:
            return logits
        top = logits.amax(-1, keepdim=True)
        rows, cols = torch.nonzero(logits >= top - top.abs() * NEAR_MAX, as_tuple=True)
        x2 = x.reshape(-1, x.shape[-1])[rows].to(w.dtype).float()  # the input as the product rounded it
        logits[rows, cols] = (x2 * w[cols].float()).sum(-1)
        return logits

    def dense_weight(self, layer: nn.Module) -> torch.Tensor:
        """The [out, in] weight as the kernel reads it (in the activations' dtype): the product with I."""
        if layer.dense is not None:
            return layer.dense.data
        k = layer.shape.in_local
        eye = torch.eye(k, dtype=layer.int4_parts[0][1].dtype, device=layer.int4_parts[0][0].device)
        return int4_matmul(eye, layer.int4_parts, None).t()


def share_tied_dense(head: nn.Module, table: torch.Tensor) -> bool:
    """A tied LM head's dense copy is the embedding table itself where the two hold the same values (the
    converter gives a tied GGUF head its own quantized copy; the table is gguf's dequantization rounded to the
    model's dtype once, as the dense copy is): one table in memory instead of two. Returns whether shared."""
    dense = getattr(head, "batched_dense", None)
    if dense is None or dense.shape != table.shape or dense.dtype != table.dtype or not torch.equal(dense, table):
        return False
    head.batched_dense = table.data
    return True


def uses_dense(rows: int) -> bool:
    """Whether a product of this many rows runs on the dense bf16 copy (the one place the rule lives)."""
    return rows >= DENSE_FROM_ROWS


def int4_matmul(x: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]],
                bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T for W the sum of the packed parts (one for 4-bit codes, two for 8-bit), in x's dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    act = parts[0][1].dtype
    x2 = (x if x.dim() == 2 else x.reshape(-1, k)).to(act)  # views are operators too: two per product saved
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, parts[0][0], KERNEL_GROUP, parts[0][1])
    for packed, scale_zero in parts[1:]:
        y += torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, KERNEL_GROUP, scale_zero)
    y = y.to(x.dtype)
    if bias is not None:
        y += bias
    return y if x.dim() == 2 else y.reshape(*lead, y.shape[-1])


def int4_parts(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
               dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The (packed weight, scales-and-zeros) pairs whose products sum to x @ W^T, W = codes * scales + mins
    (per 16 inputs); None where the kernel's layout cannot hold W exactly (other than in scale rounding)."""
    out, k = codes.shape
    pairs = (scales[:, 0::2], scales[:, 1::2], mins[:, 0::2], mins[:, 1::2])
    if codes.device.type != "cpu" or out % 16 or k % KERNEL_GROUP:
        return None
    if not (torch.equal(pairs[0], pairs[1]) and torch.equal(pairs[2], pairs[3])):
        return None  # scales that change every 16 inputs (Q6_K)
    s, m = pairs[0], pairs[2]
    if int(codes.max()) < 16:
        return [_pack(codes, s, m + 8 * s, dtype)]
    # hi centred on zero (no large opposite parts to cancel once each product is rounded to 16 bits)
    hi, lo = codes >> 4, codes & 0x0F
    return [_pack(hi, 16 * s, torch.zeros_like(s), dtype), _pack(lo, s, m + 136 * s, dtype)]


def _pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype):
    """One weight in the kernel's layout: q [out, in] in 0..15, scale/zero [out, in / 32] for (q - 8) * scale + zero."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), INNER_K_TILES)
    scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()  # [in / 32, out, 2]
    return packed, scale_zero
