"""Roofline arithmetic on a real shape (Llama-3-8B), and the measurements' plumbing on CPU."""

from __future__ import annotations

import pytest
import torch

from headrace.bench import roofline
from headrace.common.models.source import resolve_model
from headrace.common.models.arch import arch_from_hf_config


@pytest.fixture(scope="module")
def llama3_8b():
    return arch_from_hf_config(resolve_model("random:llama-3-8b").hf_config())


def rates(copy: float, flops: float) -> roofline.DeviceRates:
    return roofline.DeviceRates("test", copy, flops, "bfloat16", 8192, 1 << 30)


def test_llama3_8b_counts(llama3_8b):
    # 8.03 B parameters, of which the untied 128256 x 4096 input embedding is read only row by row.
    assert llama3_8b.num_params() == 8_030_261_248
    assert roofline.step_weight_params(llama3_8b) == 8_030_261_248 - 128256 * 4096
    assert roofline.kv_bytes_per_token(llama3_8b, 2) == 2 * 32 * 8 * 128 * 2


def test_decode_roofline(llama3_8b):
    r = rates(4e12, 8e14)
    weight_bytes = roofline.step_weight_params(llama3_8b) * 2
    assert roofline.decode_roofline_tokens_per_s(r, llama3_8b, 2, 1, 0) == pytest.approx(4e12 / weight_bytes)
    # batch 64 at 2k context: the KV read (64 x 2048 x 128 KiB = 17 GB) outweighs the 15 GB of weights
    step = weight_bytes + 64 * 2048 * 131072
    assert roofline.decode_roofline_tokens_per_s(r, llama3_8b, 2, 64, 2048) == pytest.approx(64 * 4e12 / step)
    assert roofline.compute_roofline_tokens_per_s(r, llama3_8b) == pytest.approx(8e14 / (2 * weight_bytes / 2))


def test_measure_on_cpu():
    copy, nbytes = roofline.measure_copy_bandwidth(torch.device("cpu"), nbytes=1 << 20, reps=3)
    flops, n = roofline.measure_matmul_rate(torch.device("cpu"), torch.float32, n=128, reps=2)
    assert copy > 0 and nbytes == 1 << 20 and flops > 0 and n == 128
    assert roofline.device_name(torch.device("cpu")).startswith("cpu (")
