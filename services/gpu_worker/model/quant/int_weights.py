"""Integer weights in groups, 16-bit activations (W4A16, W8A16): GPTQ, AWQ "GEMM" and compressed-tensors
`pack-quantized` checkpoints, and random presets quantized at load.

Every format is loaded as stored and then turned into one layout (`kernels/w4a16_matmul.py` takes it):
    qweight  int32 [in / (32 / bits), out]  values packed along the input, value k in bits (k % pack) * bits
    scales   [in / group, out]              model dtype
    zeros    [in / group, out]              model dtype, the zero point as a number (2^(bits-1) if symmetric)
    perm     int64 [in] or None             GPTQ act-order: input rows sorted by group at load, so a
                                            forward gathers x's columns once instead of groups per row
w[k, n] = (q[k, n] - zeros[k // group, n]) * scales[k // group, n]; y = x @ w.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from headrace.common.models.quant import QuantSpec
from headrace.kernels.int_packing import dequantize, pack, unpack
from headrace.services.gpu_worker.model.quant.base import LinearMethod
from headrace.services.gpu_worker.model.quant.params import LinearShape, TensorLayout, new_param

# AutoAWQ packs output columns 0..7 of an int32 into its nibbles in this order: nibble i holds column
# _AWQ_ORDER[i]; reading column j back takes nibble _AWQ_REVERSE[j].
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)


class IntWeightLinear(LinearMethod):
    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self.bits = spec.bits
        self.per = 32 // spec.bits

    def group_size(self, layer: nn.Module) -> int:
        return self.spec.group_size or layer.shape.in_local

    def create_weights(self, layer: nn.Module, shape: LinearShape, dtype: torch.dtype, device: torch.device) -> None:
        g = self.spec.group_size
        if g is not None and shape.in_local % g:
            raise ValueError(f"group size {g} does not divide this rank's {shape.in_local} input features")
        fmt = self.spec.checkpoint_format
        if fmt == "random":  # staged dense, quantized once every part has landed (on_part_loaded)
            new_param(layer, "weight", (shape.out_local, shape.in_local), dtype, device,
                      TensorLayout(out_dim=0, in_dim=1))
            layer.parts_left = len(shape.shards)
            return
        declare = {"gptq": self._gptq_tensors, "awq": self._awq_tensors, "compressed-tensors": self._ct_tensors}
        if fmt not in declare:
            raise ValueError(f"integer weights in format {fmt!r}")
        for name, size, dt, layout in declare[fmt](shape.in_local, shape.out_local, dtype):
            new_param(layer, name, size, dt, device, layout)

    def _grouped(self, out_dim: int, in_dim: int, out_per_elem: int = 1) -> TensorLayout:
        """A tensor with one element per group of inputs; per-channel ones are read whole by every rank."""
        g = self.spec.group_size
        return TensorLayout(out_dim=out_dim, out_per_elem=out_per_elem, in_dim=in_dim if g else None,
                            in_per_elem=g or 1)

    def _num_groups(self, k: int) -> int:
        return k // self.spec.group_size if self.spec.group_size else 1

    def _gptq_tensors(self, k: int, n: int, dtype: torch.dtype):
        p, groups = self.per, self._num_groups(k)
        return [("qweight", (k // p, n), torch.int32, TensorLayout(out_dim=1, in_dim=0, in_per_elem=p)),
                ("qzeros", (groups, n // p), torch.int32, self._grouped(1, 0, p)),
                ("scales", (groups, n), dtype, self._grouped(1, 0)),
                ("g_idx", (k,), torch.int32, TensorLayout(in_dim=0, optional=True))]

    def _awq_tensors(self, k: int, n: int, dtype: torch.dtype):
        p, groups = self.per, self._num_groups(k)
        return [("qweight", (k, n // p), torch.int32, TensorLayout(out_dim=1, out_per_elem=p, in_dim=0)),
                ("qzeros", (groups, n // p), torch.int32, self._grouped(1, 0, p)),
                ("scales", (groups, n), dtype, self._grouped(1, 0))]

    def _ct_tensors(self, k: int, n: int, dtype: torch.dtype):
        p, groups = self.per, self._num_groups(k)
        tensors = [("weight_packed", (n, k // p), torch.int32, TensorLayout(out_dim=0, in_dim=1, in_per_elem=p)),
                   ("weight_scale", (n, groups), dtype, self._grouped(0, 1)),
                   ("weight_shape", (2,), torch.int64, TensorLayout(optional=True)),
                   ("weight_g_idx", (k,), torch.int32, TensorLayout(in_dim=0, optional=True))]
        if not self.spec.symmetric:
            tensors.append(("weight_zero_point", (n // p, groups), torch.int32, self._grouped(0, 1, p)))
        return tensors

    def on_part_loaded(self, layer: nn.Module) -> None:
        if self.spec.checkpoint_format != "random":
            return
        layer.parts_left -= 1
        if layer.parts_left == 0:  # quantize now, so a dense layer is held one at a time
            q, scales, zeros = quantize_rtn(layer.weight.data.t(), self.bits, self.group_size(layer))
            del layer.weight
            self._store(layer, q, scales, zeros, None)

    def process_after_loading(self, layer: nn.Module) -> None:
        fmt, bits = self.spec.checkpoint_format, self.bits
        dtype = layer.params_dtype
        if fmt == "random":
            return
        if fmt == "gptq":
            q = unpack(layer.qweight.data, bits, 0)
            zeros = unpack(layer.qzeros.data, bits, 1) + self.spec.gptq_zero_offset
            scales, g_idx = layer.scales.data, getattr(layer, "g_idx", None)
        elif fmt == "awq":
            q = unpack(layer.qweight.data, bits, 1, _AWQ_REVERSE)
            zeros = unpack(layer.qzeros.data, bits, 1, _AWQ_REVERSE)
            scales, g_idx = layer.scales.data, None
        else:
            q = unpack(layer.weight_packed.data, bits, 1).t()
            scales = layer.weight_scale.data.t()
            if self.spec.symmetric:
                zeros = torch.full_like(scales, 1 << (bits - 1))
            else:
                zeros = unpack(layer.weight_zero_point.data, bits, 0).t()
            g_idx = getattr(layer, "weight_g_idx", None)
        perm = None
        if g_idx is not None and getattr(g_idx, "loaded", False):
            q, perm = self._sort_by_group(layer, q, g_idx.data)
        for name in [n for n, _ in layer.named_parameters(recurse=False) if n != "bias"]:
            delattr(layer, name)
        self._store(layer, q, scales.to(dtype), zeros.to(dtype), perm)

    def _sort_by_group(self, layer: nn.Module, q: torch.Tensor, g_idx: torch.Tensor):
        """Act-order: rows of a group are scattered over the input; sort them together (stable), so groups
        are contiguous again and the forward permutes x's columns to match. None if already in order."""
        g = self.group_size(layer)
        k = q.shape[0]
        in_order = torch.arange(k, device=q.device) // g
        if torch.equal(g_idx.long(), in_order):
            return q, None
        if layer.shape.in_local != layer.shape.in_features:
            raise ValueError("act-order (desc_act) checkpoints are served with --tensor-parallel-size 1 for now: "
                             "a row-parallel rank would hold parts of every group")
        perm = torch.argsort(g_idx.long(), stable=True)
        if not torch.equal(g_idx.long()[perm], in_order):
            raise ValueError(f"g_idx does not assign exactly {g} input rows to each group")
        return q[perm], perm

    def _store(self, layer: nn.Module, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               perm: torch.Tensor | None) -> None:
        keep = lambda t: nn.Parameter(t.contiguous(), requires_grad=False)  # noqa: E731
        layer.qweight = keep(pack(q, self.bits, 0))
        layer.scales = keep(scales)
        layer.zeros = keep(zeros)
        layer.perm = perm

    def dense_weight(self, layer: nn.Module) -> torch.Tensor:
        w = dequantize(layer.qweight, layer.scales, layer.zeros, self.group_size(layer), self.bits)
        if layer.perm is not None:  # rows were sorted by group at load: put them back in input order
            w = torch.empty_like(w).index_copy_(0, layer.perm, w)
        return w.t()

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.perm is not None:
            x = x.index_select(-1, layer.perm)
        g = self.group_size(layer)
        if x.is_cuda and self.bits == 4:
            from headrace.kernels.w4a16_matmul import w4a16_matmul

            return w4a16_matmul(x, layer.qweight, layer.scales, layer.zeros, g, bias)
        # CPU (and 8-bit for now): the torch reference, dequantizing this layer's weight for this product.
        w = dequantize(layer.qweight, layer.scales, layer.zeros, g, self.bits)
        return F.linear(x, w.t().to(x.dtype), bias)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int):
    """Round-to-nearest symmetric quantization of a dense [in, out] weight: (q, scales, zeros) in the
    canonical layout's value ranges (q unsigned, zeros 2^(bits-1))."""
    k, n = w.shape
    half = 1 << (bits - 1)
    groups = w.float().reshape(k // group_size, group_size, n)
    scales = groups.abs().amax(dim=1).clamp(min=1e-8) / (half - 1)
    q = torch.round(groups / scales[:, None, :]).clamp(-half, half - 1) + half
    return q.reshape(k, n).to(torch.int32), scales.to(w.dtype), torch.full_like(scales, half).to(w.dtype)
