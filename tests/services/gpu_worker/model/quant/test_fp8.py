"""FP8 linears on CPU (the reference path): per-channel, per-tensor (one scale per merged part), 128x128
blocks and online quantization load and multiply as the dense weight they encode."""

from __future__ import annotations

import pytest
import torch

from headrace.common.models.quant import QuantSpec
from headrace.services.gpu_worker.model.layers import ColumnParallelLinear, RowParallelLinear
from headrace.services.gpu_worker.model.quant.fp8 import FP8, Fp8Linear
from headrace.services.gpu_worker.parallel import TPGroup

CPU = torch.device("cpu")


def fp8_with_scale(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale).clamp(-448, 448).to(FP8)


def test_per_tensor_scales_of_merged_parts_stay_with_their_rows():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 64, generator=g) * s for n, s in ((32, 0.1), (16, 3.0))]
    spec = QuantSpec(kind="fp8", checkpoint_format="compressed-tensors", weight_scale="tensor")
    layer = ColumnParallelLinear(64, [32, 16], False, TPGroup(), torch.float32, CPU, Fp8Linear(spec))
    dense = []
    for shard, w in enumerate(parts):
        scale = w.abs().max() / 448
        q = fp8_with_scale(w, scale)
        layer.weight.weight_loader(layer.weight, q, shard)
        layer.weight_scale.weight_loader(layer.weight_scale, scale.reshape(1), shard)
        dense.append(q.float() * scale)
    layer.quant_method.process_after_loading(layer)
    assert layer.weight.dtype == FP8 and layer.weight_scale.shape == (48,)
    x = torch.randn(3, 64, generator=g)
    torch.testing.assert_close(layer(x), x @ torch.cat(dense).t(), rtol=1e-5, atol=1e-5)


def test_block_scales_shard_by_whole_blocks():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(128, 256, generator=g)
    scales = torch.rand(1, 2, generator=g) + 0.01
    q = fp8_with_scale(w, scales.repeat_interleave(128, 0).repeat_interleave(128, 1))
    dense = q.float() * scales.repeat_interleave(128, 0).repeat_interleave(128, 1)
    spec = QuantSpec(kind="fp8", checkpoint_format="fp8", weight_scale="block", block_size=(128, 128))
    x = torch.randn(2, 256, generator=g)
    out = 0
    for rank in range(2):
        layer = RowParallelLinear(256, 128, False, TPGroup(rank, 2), torch.float32, CPU, Fp8Linear(spec))
        layer.weight.weight_loader(layer.weight, q)
        layer.weight_scale_inv.weight_loader(layer.weight_scale_inv, scales)
        layer.quant_method.process_after_loading(layer)
        out = out + layer.quant_method.apply(layer, x[:, rank * 128 : (rank + 1) * 128], None)
    torch.testing.assert_close(out, x @ dense.t(), rtol=1e-5, atol=1e-5)


def test_online_quantization_keeps_each_row_within_half_an_fp8_step():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=g, dtype=torch.float32)
    spec = QuantSpec(kind="fp8", checkpoint_format="online")
    layer = ColumnParallelLinear(64, [32], False, TPGroup(), torch.float32, CPU, Fp8Linear(spec))
    layer.weight.weight_loader(layer.weight, w, 0)
    assert layer.weight.dtype == FP8  # quantized as soon as its one part landed
    dense = layer.weight.float() * layer.weight_scale[:, None]
    assert torch.allclose(dense, w, rtol=2**-3, atol=1e-6)  # e4m3 keeps 3 mantissa bits
    assert torch.allclose(dense.abs().amax(1), w.abs().amax(1))  # each row's maximum is exact


def test_block_scales_of_parts_smaller_than_a_block_stay_with_their_rows():
    """A 64-row k_proj has one partial block row of scales; merged after a 128-row q_proj its rows must still
    meet their own scales."""
    g = torch.Generator().manual_seed(3)
    spec = QuantSpec(kind="fp8", checkpoint_format="compressed-tensors", weight_scale="block", block_size=(128, 128))
    layer = ColumnParallelLinear(256, [128, 64], False, TPGroup(), torch.float32, CPU, Fp8Linear(spec))
    dense = []
    for shard, rows in enumerate((128, 64)):
        w = torch.randn(rows, 256, generator=g)
        scales = torch.rand(1, 2, generator=g) + 0.01
        full = scales.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)
        q = fp8_with_scale(w, full)
        layer.weight.weight_loader(layer.weight, q, shard)
        layer.weight_scale.weight_loader(layer.weight_scale, scales, shard)
        dense.append(q.float() * full)
    layer.quant_method.process_after_loading(layer)
    x = torch.randn(2, 256, generator=g)
    torch.testing.assert_close(layer(x), x @ torch.cat(dense).t(), rtol=1e-5, atol=1e-5)


def test_tensor_parallel_block_scales_need_whole_blocks_per_rank():
    spec = QuantSpec(kind="fp8", checkpoint_format="fp8", weight_scale="block", block_size=(128, 128))
    with pytest.raises(ValueError, match="whole blocks"):
        RowParallelLinear(128, 64, False, TPGroup(0, 2), torch.float32, CPU, Fp8Linear(spec))
