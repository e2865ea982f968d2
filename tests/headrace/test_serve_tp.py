"""Tensor parallelism through the real server on CPU (gloo): same greedy tokens as TP=1, which the offline
engine (one process, one rank, the same model runner) gives without a second server start."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.headrace.server_process import ServerProcess

pytestmark = pytest.mark.slow


def greedy(srv: ServerProcess, prompts: list, max_tokens: int) -> list[list[str]]:
    out = []
    for p in prompts:
        r = srv.post("/v1/completions", json={"model": srv.model, "prompt": p, "max_tokens": max_tokens,
                                               "temperature": 0, "ignore_eos": True, "logprobs": 0})
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["logprobs"]["tokens"])
    return out


def run(model_args: list[str], tp: int, prompts: list, max_tokens: int) -> list[list[str]]:
    # float32: a tensor-parallel sum adds the ranks' parts in another order, which only the float path's
    # results survive token for token (the kept-quantized GGUF path rounds each part to bf16; docs/cpu.md).
    srv = ServerProcess(*model_args, "--max-model-len", "512", "--tensor-parallel-size", str(tp), "--dtype", "float32")
    try:
        srv.wait_ready()
        srv.model = srv.get("/v1/models").json()["data"][0]["id"]
        return greedy(srv, prompts, max_tokens)
    finally:
        assert not srv.stop()


def offline(model: str, prompts: list, max_tokens: int) -> list[list[str]]:
    """TP=1: the offline engine's greedy tokens, each as the API names it (the text its logprobs carry)."""
    from headrace import LLM, SamplingParams

    llm = LLM(model, max_model_len=512, dtype="float32", log=lambda *_: None)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    return [llm.codec.token_texts(list(o.outputs[0].token_ids)) for o in outs]


def test_embedded_model_tp3_equals_tp1():
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    want = offline("", prompts, 12)
    assert all(len(tokens) == 12 for tokens in want)
    assert run([], 3, prompts, 12) == want


def test_tiny_random_llama_tp2_equals_tp1():
    prompts = [[1, 5, 9, 200, 31, 77, 4, 18], [7, 7, 8, 100, 13, 400, 2, 9, 9, 11]]
    want = offline("random:tiny-llama", prompts, 10)
    assert all(len(tokens) == 10 for tokens in want)
    assert run(["--model", "random:tiny-llama"], 2, prompts, 10) == want


def test_tp2_on_embedded_model_fails_at_start_naming_head_counts():
    out = subprocess.run([sys.executable, "-m", "headrace.cli", "serve", "--tensor-parallel-size", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "9 attention heads" in out.stderr
