"""Integer-weight linears: GPTQ (v1 zeros, act-order, 4 and 8 bits) and AWQ tensors written by the
formats' own packing rules load, shard across tensor-parallel ranks and multiply as the dense weight they
encode."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from headrace.common.models.quant import QuantSpec
from headrace.services.gpu_worker.model.layers import ColumnParallelLinear, RowParallelLinear
from headrace.kernels.int_packing import pack, unpack
from headrace.services.gpu_worker.model.quant.int_weights import IntWeightLinear, quantize_rtn
from headrace.services.gpu_worker.parallel import TPGroup
from tests.services.gpu_worker.model.quant.checkpoint_writers import awq_tensors, gptq_tensors

CPU = torch.device("cpu")


@dataclass(frozen=True)
class LocalRank(TPGroup):
    """A rank of a TP group whose collectives the test does by hand (it sums the ranks' partial sums)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


def load(layer, parts: list[dict[str, torch.Tensor]]):
    params = dict(layer.named_parameters())
    for shard, tensors in enumerate(parts):
        for name, t in tensors.items():
            params[name].weight_loader(params[name], t, shard)
    layer.quant_method.process_after_loading(layer)
    return layer


def test_pack_and_unpack_invert_each_other_in_sequential_field_order():
    words = pack(torch.tensor([[1], [2], [3], [4], [5], [6], [7], [15]]), 4, 0)
    assert words.item() == int("F7654321", 16) - 2**32  # value k in bits 4k..4k+3; the top nibble is the sign
    values = torch.randint(0, 16, (64, 24))
    assert torch.equal(unpack(pack(values, 4, 0), 4, 0), values)
    assert torch.equal(unpack(pack(values, 8, 1), 8, 1), values.clamp(max=15))


@pytest.mark.parametrize("bits,group,symmetric,act_order", [(4, 32, True, None), (4, 64, False, None),
                                                           (8, 32, True, None), (4, 32, True, 7)])
def test_gptq_merged_column_linear_equals_its_dense_weight(bits, group, symmetric, act_order):
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, 128, generator=g) * 0.05 for n in (64, 32)]
    parts, dense = zip(*(gptq_tensors(w, bits, group, symmetric, act_order) for w in ws))
    spec = QuantSpec(kind="int", checkpoint_format="gptq", bits=bits, group_size=group, symmetric=symmetric,
                     desc_act=act_order is not None, gptq_zero_offset=1)
    layer = load(ColumnParallelLinear(128, [64, 32], False, TPGroup(), torch.float32, CPU,
                                      IntWeightLinear(spec)), list(parts))
    assert (layer.perm is not None) == (act_order is not None)
    x = torch.randn(5, 128, generator=g)
    torch.testing.assert_close(layer(x), x @ torch.cat(dense).float().t(), rtol=1e-5, atol=1e-5)


def test_awq_tensors_shard_over_two_ranks_as_the_dense_weight_does():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g) * 0.05
    tensors, dense = awq_tensors(w, 64)
    spec = QuantSpec(kind="int", checkpoint_format="awq", bits=4, group_size=64, symmetric=False)
    x = torch.randn(3, 256, generator=g)
    want = x @ dense.float().t()
    cols = [load(ColumnParallelLinear(256, [64], False, LocalRank(r, 2), torch.float32, CPU,
                                      IntWeightLinear(spec)), [tensors])(x) for r in range(2)]
    torch.testing.assert_close(torch.cat(cols, dim=-1), want, rtol=1e-5, atol=1e-5)
    rows = [load(RowParallelLinear(256, 64, False, LocalRank(r, 2), torch.float32, CPU,
                                   IntWeightLinear(spec)), [tensors])(x[:, r * 128 : (r + 1) * 128])
            for r in range(2)]
    torch.testing.assert_close(rows[0] + rows[1], want, rtol=1e-5, atol=1e-5)


def test_a_group_split_by_a_rank_boundary_is_refused():
    spec = QuantSpec(kind="int", checkpoint_format="gptq", bits=4, group_size=128)
    with pytest.raises(ValueError, match="group size 128 does not divide"):
        RowParallelLinear(192, 64, False, LocalRank(0, 2), torch.float32, CPU, IntWeightLinear(spec))


def test_random_weights_are_quantized_once_every_merged_part_has_landed():
    spec = QuantSpec(kind="int", checkpoint_format="random", bits=4, group_size=32)
    layer = ColumnParallelLinear(64, [32, 32], False, TPGroup(), torch.float32, CPU, IntWeightLinear(spec))
    g = torch.Generator().manual_seed(2)
    parts = [torch.randn(32, 64, generator=g) for _ in range(2)]
    layer.weight.weight_loader(layer.weight, parts[0], 0)
    assert hasattr(layer, "weight")  # half a layer: still dense
    layer.weight.weight_loader(layer.weight, parts[1], 1)
    assert not hasattr(layer, "weight") and layer.qweight.dtype == torch.int32
    q, scales, zeros = quantize_rtn(torch.cat(parts).t(), 4, 32)
    dense = ((q.float() - zeros.repeat_interleave(32, 0)) * scales.repeat_interleave(32, 0)).t()
    x = torch.randn(2, 64, generator=g)
    torch.testing.assert_close(layer(x), x @ dense.t(), rtol=1e-5, atol=1e-5)
    assert (dense - torch.cat(parts)).abs().max() <= scales.max() / 2 + 1e-6  # round to nearest
