"""GGUF linears kept quantized: every format's blocks, loaded as the converter stores them (codes, scales and
mins per 16 inputs) into a merged column-parallel linear, are repacked for the CPU int4 kernel without losing
an integer: in float32 the kernel's weight is gguf's own dequantization bit for bit, in bf16 it is that
weight with scale and zero rounded to bf16. Q6_K (16-input groups) is held dense."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from headrace.common.models.gguf_blocks import affine_groups
from headrace.services.gpu_worker.model.layers import ColumnParallelLinear
from headrace.services.gpu_worker.model.quant import onednn_packed
from headrace.services.gpu_worker.model.quant.gguf_weights import (DENSE_FROM_ROWS, NEAR_MAX, GGUFLinear, int4_matmul,
                                                                  uses_dense)
from headrace.services.gpu_worker.parallel import SINGLE
from tests.common.models.test_gguf_blocks import random_blocks

CPU = torch.device("cpu")
K = 256  # one K-quant super-block per row


def gguf_layer(fmts: list[str], rows: int, dtype: torch.dtype, seed: int = 0, keeps_rows: bool = False):
    """A merged linear with one part per format; returns it and gguf's dequantized [out, K] weight."""
    layer = ColumnParallelLinear(K, [rows] * len(fmts), False, SINGLE, dtype, CPU, GGUFLinear(dtype, keeps_rows))
    params = dict(layer.named_parameters())
    refs = []
    for shard, fmt in enumerate(fmts):
        raw = random_blocks(fmt, rows, K, seed + shard)
        refs.append(dequantize(raw, GGMLQuantizationType[fmt]).reshape(rows, K))
        for name, arr in zip(("codes", "scales", "mins"), affine_groups(raw, fmt, rows, K)):
            params[name].weight_loader(params[name], torch.from_numpy(arr), shard)
    layer.quant_method.process_after_loading(layer)
    return layer, torch.from_numpy(np.concatenate(refs))


@pytest.mark.parametrize("fmts", [["Q4_0"], ["Q4_1"], ["Q8_0"], ["Q4_1", "Q8_0", "Q4_0"]])
def test_kernel_weight_in_float32_is_ggufs_dequantization_exactly(fmts):
    layer, ref = gguf_layer(fmts, 32, torch.float32)
    assert layer.dense is None and len(layer.int4_parts) == (2 if "Q8_0" in fmts else 1)
    torch.testing.assert_close(layer.quant_method.dense_weight(layer), ref, atol=0, rtol=0)


def test_q4_k_kernel_weight_in_float32_is_off_by_one_rounding_of_its_zero_at_most():
    """Q4_K's folded zero, -dmin * m + 8 * d * sc, is two 17-bit numbers whose sum float32 may round once."""
    layer, ref = gguf_layer(["Q4_K"], 32, torch.float32)
    raw = random_blocks("Q4_K", 32, K, 0)
    _, scales, mins = (torch.from_numpy(a).repeat_interleave(16, 1) for a in affine_groups(raw, "Q4_K", 32, K))
    ulp = (mins.abs() + 8 * scales.abs()) * 2.0**-23
    diff = (layer.quant_method.dense_weight(layer) - ref).abs()
    assert bool((diff <= ulp).all()), float((diff / ulp).max())


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0", "Q4_K"])
def test_bf16_kernel_rounds_only_scale_and_zero(fmt):
    layer, ref = gguf_layer([fmt], 48, torch.bfloat16)
    raw = random_blocks(fmt, 48, K, 0)
    codes, scales, mins = (torch.from_numpy(a) for a in affine_groups(raw, fmt, 48, K))
    s, m = scales.repeat_interleave(16, 1), mins.repeat_interleave(16, 1)
    bf = lambda t: t.bfloat16().float()  # noqa: E731
    if fmt == "Q8_0":  # two 4-bit parts, each product rounded to bf16: hi (16 s, zero 0), lo (s, m + 136 s)
        hi, lo = (codes >> 4).float(), (codes & 15).float()
        expected = ((hi - 8) * bf(16 * s)).bfloat16() + ((lo - 8) * bf(s) + bf(m + 136 * s)).bfloat16()
    else:
        expected = (codes.float() - 8) * bf(s) + bf(m + 8 * s)
    got = layer.quant_method.dense_weight(layer).float()
    torch.testing.assert_close(got, expected.bfloat16().float(), atol=0, rtol=0)
    x = torch.randn(5, K)
    y = layer(x.bfloat16()).float()
    # bf16 activations against the float32 oracle: within a few bf16 roundings of the terms' magnitude
    assert bool(((y - x @ ref.t()).abs() <= 2**-6 * (x.abs() @ ref.abs().t())).all())


def test_q6_k_and_layers_mixing_it_are_held_dense_and_exact_before_rounding():
    layer, ref = gguf_layer(["Q4_K", "Q6_K"], 16, torch.float32)
    assert layer.int4_parts is None
    torch.testing.assert_close(layer.dense.data, ref, atol=0, rtol=0)


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
def test_products_of_many_rows_run_on_the_dense_copy_of_ggufs_dequantization(fmt):
    """From DENSE_FROM_ROWS rows the product reads a bf16 copy of gguf's exact dequantization (one rounding
    per weight); below it, the int4 kernel."""
    layer, ref = gguf_layer([fmt], 48, torch.bfloat16, keeps_rows=True)
    torch.testing.assert_close(layer.batched_dense.float(), ref.bfloat16().float(), atol=0, rtol=0)
    if onednn_packed.available():  # prepacked for oneDNN; a layer that reads no rows keeps no plain copy
        assert layer.batched_packed is not None
        assert gguf_layer([fmt], 48, torch.bfloat16)[0].batched_dense is None
    x = torch.randn(DENSE_FROM_ROWS, K).bfloat16()
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, ref.bfloat16()), atol=0, rtol=0)
    few = x[: DENSE_FROM_ROWS - 1]
    torch.testing.assert_close(layer(few), int4_matmul(few, layer.int4_parts, None), atol=0, rtol=0)
    assert not uses_dense(DENSE_FROM_ROWS - 1) and uses_dense(DENSE_FROM_ROWS)


@pytest.mark.parametrize("rows", [3, DENSE_FROM_ROWS])
def test_logits_near_the_max_are_recomputed_in_float32(rows):
    """An LM head's bf16 logits put near-ties a rounding step apart: the entries near each row's max become
    the float32 product of the bf16 input and the dense copy, so the greedy token is that product's."""
    layer, _ = gguf_layer(["Q4_1", "Q8_0"], 256, torch.bfloat16, seed=3, keeps_rows=True)
    w = layer.batched_dense.float()
    big = w.norm(dim=1).argsort(descending=True)  # pairs of the longest rows: the tie is each row's max
    x = torch.stack([_tie(w[big[2 * i]], w[big[2 * i + 1]]) for i in range(rows)]).bfloat16()
    rough = layer(x).float()
    refined = layer.quant_method.refine_near_max(layer, x, rough.clone())
    exact = x.float() @ layer.batched_dense.float().t()
    near = rough >= rough.amax(-1, keepdim=True) * (1 - NEAR_MAX)
    assert int(near.sum()) >= 2 * rows  # each row's tie is among them
    torch.testing.assert_close(refined[near], exact[near], atol=1e-5, rtol=1e-5)
    assert torch.equal(refined[~near], rough[~near])
    assert torch.equal(refined.argmax(-1), exact.argmax(-1))


def _tie(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """An input whose products with rows a and b are equal before rounding and large: a near-tie at the top."""
    s, d = a + b, a - b
    return 4 * (s - (s @ d) / (d @ d) * d) / s.norm()
