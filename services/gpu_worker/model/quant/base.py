"""The interface every linear-layer method implements: unquantized, integer-weight and fp8.

A parallel linear (layers.py) owns the sharding; its method owns the tensors: which ones the checkpoint
holds (`create_weights`, declared in the checkpoint's own layout), what they become once loaded
(`process_after_loading`, the layout the kernels take), and the product (`apply`).
"""

from __future__ import annotations

import torch
from torch import nn

from headrace.services.gpu_worker.model.quant.params import LinearShape


class LinearMethod:
    def create_weights(self, layer: nn.Module, shape: LinearShape, dtype: torch.dtype, device: torch.device) -> None:
        raise NotImplementedError

    def on_part_loaded(self, layer: nn.Module) -> None:
        """Called after each checkpoint tensor lands (methods that quantize at load act once all have)."""

    def process_after_loading(self, layer: nn.Module) -> None:
        """Turn the checkpoint's tensors into the layout `apply` reads (run once, after every tensor landed)."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def dense_weight(self, layer: nn.Module) -> torch.Tensor:
        """The [out, in] weight this layer multiplies by, dequantized (oracles and exports)."""
        raise NotImplementedError
