"""A plain [out, in] weight in the model's dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from headrace.services.gpu_worker.model.quant.base import LinearMethod
from headrace.services.gpu_worker.model.quant.params import LinearShape, TensorLayout, new_param

WEIGHT = TensorLayout(out_dim=0, in_dim=1)


class UnquantizedLinear(LinearMethod):
    def create_weights(self, layer: nn.Module, shape: LinearShape, dtype: torch.dtype, device: torch.device) -> None:
        new_param(layer, "weight", (shape.out_local, shape.in_local), dtype, device, WEIGHT)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)

    def dense_weight(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight.data
