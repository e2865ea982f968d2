"""The fused-MoE micro-benchmark at a tiny shape (CPU: Triton's interpreter): it counts the bytes of the
experts the routing touches and reports a correct kernel."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from headrace.bench import kernels as kernel_bench  # noqa: E402


def test_moe_bench_counts_touched_experts_and_matches_the_reference():
    row = kernel_bench.bench_moe("tiny-mixtral", 3, torch.float32, torch.device("cpu"), 1e9, reps=1)
    touched = row["experts_touched"]
    assert 2 <= touched <= 4  # top 2 of 4 experts for 3 tokens
    assert row["bytes"] == touched * 3 * 64 * 96 * 4 + 2 * 3 * 64 * 4
    assert row["rel_err"] < 1e-4 and row["time_us"] > 0 and row["torch_loop_time_us"] > 0
