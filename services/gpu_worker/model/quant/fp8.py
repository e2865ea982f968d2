"""FP8 (e4m3) weights with per-tensor, per-channel or 128x128 block scales; activations quantized to fp8
per token at run time (or with the checkpoint's static scale): HF `fp8`, compressed-tensors
`float-quantized`, and online `--quantization fp8` of a 16-bit checkpoint (per output channel, each layer
quantized as soon as its parts have landed, so the 16-bit weights are never all held at once).

After loading, every layer holds `weight` fp8 [out, in], `weight_scale` float32 [out] (per-tensor scales
are spread over their part's rows) or [out / 128, in / 128] for blocks, and `input_scale` (a float32
scalar, static activations only). On a GPU per-channel layers run `kernels/fp8_gemv.py` for one row (the
weight streamed, x left unquantized) and `torch._scaled_mm` (rowwise scales) for more, block-scaled layers
`kernels/fp8_block_matmul.py` (x quantized per token and 128-column group); CPUs run the reference: the
weight dequantized for the product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from headrace.common.models.quant import QuantSpec
from headrace.services.gpu_worker.model.quant.base import LinearMethod
from headrace.services.gpu_worker.model.quant.params import LinearShape, TensorLayout, new_param

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
BLOCK = 128


def to_fp8(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """t / scale in e4m3, saturated at its largest value."""
    return (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, in] -> (fp8, float32 scale [rows, 1]) with each row's absolute max at the fp8 maximum: a weight
    per output channel, activations per token."""
    scale = t.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return to_fp8(t, scale), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 [out, in] with per-row [out] scales, or block scales held per row and 128-column block [out,
    ceil(in / 128)] -> dense weight in `dtype`."""
    w = weight.float()
    if scale.dim() == 2:
        return (w * scale.repeat_interleave(BLOCK, 1)[:, : w.shape[1]]).to(dtype)
    return (w * scale[:, None]).to(dtype)


class Fp8Linear(LinearMethod):
    def __init__(self, spec: QuantSpec):
        self.spec = spec

    def create_weights(self, layer: nn.Module, shape: LinearShape, dtype: torch.dtype, device: torch.device) -> None:
        k, n, parts = shape.in_local, shape.out_local, len(shape.shards)
        weight = TensorLayout(out_dim=0, in_dim=1)
        if self.spec.checkpoint_format == "online":  # staged dense, quantized in on_part_loaded
            new_param(layer, "weight", (n, k), dtype, device, weight)
            layer.parts_left = parts
            return
        new_param(layer, "weight", (n, k), FP8, device, weight)
        strategy = self.spec.weight_scale
        if strategy == "block":
            if shape.in_local != shape.in_features and shape.in_local % BLOCK:
                raise ValueError(f"fp8 128x128 block scales need a rank's {k} input features in whole blocks")
            # HF fp8 calls its block scales weight_scale_inv (they multiply, despite the name).
            name = "weight_scale_inv" if self.spec.checkpoint_format == "fp8" else "weight_scale"
            new_param(layer, name, (n, -(-k // BLOCK)), torch.float32, device,
                      TensorLayout(out_dim=0, out_block=BLOCK, in_dim=1, in_per_elem=BLOCK))
        elif strategy == "channel":
            new_param(layer, "weight_scale", (n, 1), torch.float32, device, TensorLayout(out_dim=0))
        else:
            new_param(layer, "weight_scale", (parts,), torch.float32, device, TensorLayout(per_shard=True))
        if self.spec.activation_scale == "static":
            new_param(layer, "input_scale", (parts,), torch.float32, device, TensorLayout(per_shard=True))

    def on_part_loaded(self, layer: nn.Module) -> None:
        if self.spec.checkpoint_format != "online":
            return
        layer.parts_left -= 1
        if layer.parts_left == 0:
            weight, scale = quantize_rows(layer.weight.data)
            del layer.weight
            self._store(layer, weight, scale[:, 0], None)

    def process_after_loading(self, layer: nn.Module) -> None:
        if self.spec.checkpoint_format == "online":
            return
        scale = (layer.weight_scale_inv if hasattr(layer, "weight_scale_inv") else layer.weight_scale).data
        if self.spec.weight_scale == "channel":
            scale = scale[:, 0]
        elif self.spec.weight_scale == "tensor":  # each merged part's scalar over that part's rows
            scale = torch.cat([scale[i].expand(rows) for i, (rows, _) in enumerate(layer.shape.shards)])
        input_scale = layer.input_scale.data.max() if hasattr(layer, "input_scale") else None
        weight = layer.weight.data
        for name in [n for n, _ in layer.named_parameters(recurse=False) if n != "bias"]:
            delattr(layer, name)
        self._store(layer, weight, scale, input_scale)

    def _store(self, layer: nn.Module, weight: torch.Tensor, scale: torch.Tensor,
               input_scale: torch.Tensor | None) -> None:
        layer.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        layer.weight_scale = nn.Parameter(scale.float().contiguous(), requires_grad=False)
        layer.input_scale = input_scale

    def dense_weight(self, layer: nn.Module) -> torch.Tensor:
        return dequantize(layer.weight, layer.weight_scale, layer.params_dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not x.is_cuda:
            return F.linear(x, dequantize(layer.weight, layer.weight_scale, x.dtype), bias)
        x2 = x.reshape(-1, x.shape[-1])
        if layer.weight_scale.dim() == 2:  # 128x128 blocks: x quantized per token and 128-column group
            from headrace.kernels.fp8_block_matmul import fp8_block_matmul, per_token_group_quant

            x_fp8, x_scale = per_token_group_quant(x2 if x2.stride(-1) == 1 else x2.contiguous())
            y = fp8_block_matmul(x_fp8, x_scale, layer.weight, layer.weight_scale, x.dtype, bias)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        if x2.shape[0] == 1 and x2.stride(-1) == 1:  # batch-1 decode: stream the fp8 weight, x unquantized
            from headrace.kernels.fp8_gemv import fp8_gemv

            return fp8_gemv(x2, layer.weight, layer.weight_scale, bias).reshape(*x.shape[:-1], -1)
        if layer.input_scale is not None:
            x_scale = layer.input_scale.expand(x2.shape[0], 1).contiguous()
            x_fp8 = to_fp8(x2, x_scale)
        else:  # one kernel instead of torch's four (and two fp32 copies of x)
            from headrace.kernels.fp8_quant import per_token_quant

            x_fp8, x_scale = per_token_quant(x2 if x2.stride(-1) == 1 else x2.contiguous())
        y = torch._scaled_mm(x_fp8, layer.weight.t(), scale_a=x_scale, scale_b=layer.weight_scale[None, :],
                             out_dtype=x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])
