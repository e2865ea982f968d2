"""A bf16 weight prepacked for oneDNN gives F.linear's products bit for bit, at every row count and shape."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headrace.services.gpu_worker.model.quant import onednn_packed

pytestmark = pytest.mark.skipif(not onednn_packed.available(), reason="this torch build or CPU has no oneDNN bf16")


@pytest.mark.parametrize("out_features, in_features", [(960, 576), (576, 1536), (1000, 64)])
@pytest.mark.parametrize("rows", [1, 3, 12, 16, 17, 200])
def test_packed_products_equal_f_linear_bit_for_bit(out_features, in_features, rows):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(out_features, in_features, generator=g) * 0.05).bfloat16()
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    bias = torch.randn(out_features, generator=g).bfloat16()
    packed = onednn_packed.prepack(w)
    assert torch.equal(onednn_packed.linear(x, packed), F.linear(x, w))
    assert torch.equal(onednn_packed.linear(x, packed, bias), F.linear(x, w, bias))
    x3 = x.reshape(1, rows, in_features)  # leading dims, as a [batch, tokens, hidden] input has
    assert torch.equal(onednn_packed.linear(x3, packed), F.linear(x3, w))


def test_only_bf16_cpu_weights_are_packed():
    assert onednn_packed.prepack(torch.randn(8, 16)) is None  # float32: F.linear's own path (MKL)
    assert onednn_packed.prepack(torch.randn(8, 16, dtype=torch.float16)) is None
    assert onednn_packed.prepack(torch.randn(8, 16).bfloat16()) is not None


def test_inside_a_compiled_graph_the_product_is_the_same_operator():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 64, generator=g) * 0.05).bfloat16()
    packed = onednn_packed.prepack(w)
    x = torch.randn(4, 64, generator=g).bfloat16()
    bias = torch.randn(96, generator=g).bfloat16()
    assert torch.equal(torch.ops.headrace.onednn_linear(x, packed.handle, 96), F.linear(x, w))
    compiled = torch.compile(lambda t: onednn_packed.linear(t * 2, packed, bias), fullgraph=True)
    assert torch.equal(compiled(x), onednn_packed.linear(x * 2, packed, bias))


def test_a_dropped_weight_leaves_no_handle_behind():
    packed = onednn_packed.prepack(torch.randn(8, 16).bfloat16())
    handle = packed.handle
    assert handle in onednn_packed._BY_HANDLE
    del packed
    assert handle not in onednn_packed._BY_HANDLE
