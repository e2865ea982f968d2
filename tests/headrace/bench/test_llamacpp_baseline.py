"""`headrace bench latency --baseline llamacpp`: llama.cpp on the same GGUF, interleaved with our iterations,
where llama-cpp-python is importable (never a dependency); a non-GGUF model is refused with a clear line."""

from __future__ import annotations

import importlib.util
import json

import pytest

from headrace import cli
from headrace.bench import llamacpp_baseline
from headrace.common.config import EngineConfig, ModelConfig
from headrace.common.models.source import embedded_gguf_path


def test_the_baseline_runs_on_the_gguf_the_engine_serves():
    assert llamacpp_baseline.gguf_file(EngineConfig()) == embedded_gguf_path()
    assert llamacpp_baseline.gguf_file(EngineConfig(model=ModelConfig(model="/m/x.gguf"))) == "/m/x.gguf"
    with pytest.raises(llamacpp_baseline.BaselineUnavailable, match="needs a GGUF model"):
        llamacpp_baseline.gguf_file(EngineConfig(model=ModelConfig(model="random:tiny-llama")))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_latency_json_with_the_llamacpp_baseline(tmp_path):
    out = tmp_path / "latency.json"
    assert cli.main(["bench", "latency", "--device", "cpu", "--max-model-len", "128", "--input-len", "8",
                     "--output-len", "5", "--batch-size", "1", "2", "--num-iters-warmup", "1", "--num-iters", "2",
                     "--baseline", "llamacpp", "--output-json", str(out)]) == 0
    data = json.loads(out.read_text())
    llama = data["llamacpp"]
    assert llama["decode_tokens_per_s"] > 0 and llama["prefill_s_median"] > 0
    assert all(r["ours_over_llamacpp_decode_tokens_per_s"] > 0 for r in data["results"])
    assert data["results"][0]["ours_over_llamacpp_prefill_s"] > 0
