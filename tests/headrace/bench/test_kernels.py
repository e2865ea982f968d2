"""The kernel micro-benchmark runs at tiny shapes (CPU: Triton's interpreter) and reports correct kernels."""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from headrace.bench import kernels as kernel_bench  # noqa: E402


def test_kernel_bench_json(tmp_path):
    out = tmp_path / "kernels.json"
    assert kernel_bench.main(["--decode-batch", "1", "3", "--decode-context", "40", "--prefill-tokens", "37",
                              "--num-heads", "4", "--num-kv-heads", "2", "--head-dim", "32", "--reps", "1",
                              "--dtype", "float32", "--output-json", str(out)]) == 0
    data = json.loads(out.read_text())
    decode = [r for r in data["results"] if r["kernel"] == "paged_decode_attention"]
    prefill = [r for r in data["results"] if r["kernel"] == "paged_prefill_attention"]
    assert [r["batch"] for r in decode] == [1, 3] and [r["tokens"] for r in prefill] == [37]
    assert decode[1]["bytes"] == 2 * 3 * 40 * 2 * 32 * 4 + 2 * 3 * 4 * 32 * 4
    assert prefill[0]["flops"] == 4 * 4 * 32 * 37 * 38 / 2
    for r in data["results"]:
        assert r["time_us"] > 0
        assert r.get("rel_err", r.get("rel_err_vs_sdpa")) < 1e-3  # float32: the kernels match their references


def test_kernel_bench_times_a_windowed_decode_beside_the_full_one(tmp_path):
    out = tmp_path / "kernels.json"
    assert kernel_bench.main(["--decode-batch", "2", "--decode-context", "40", "--decode-window", "16",
                              "--prefill-tokens", "16", "--num-heads", "4", "--num-kv-heads", "2", "--head-dim", "32",
                              "--reps", "1", "--dtype", "float32", "--output-json", str(out)]) == 0
    decode = [r for r in json.loads(out.read_text())["results"] if r["kernel"] == "paged_decode_attention"]
    assert [r["window"] for r in decode] == [None, 16]
    assert decode[1]["bytes"] == 2 * 2 * 16 * 2 * 32 * 4 + 2 * 2 * 4 * 32 * 4  # only the keys inside the window
    assert all(r["rel_err"] < 1e-3 for r in decode)
