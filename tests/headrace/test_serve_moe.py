"""An MoE model served end to end (api, tokenizer, scheduler, worker processes): its greedy tokens equal the
offline engine's on the same random weights."""

from __future__ import annotations

import pytest

from tests.headrace.server_process import ServerProcess

pytestmark = pytest.mark.slow


def test_qwen2_moe_is_served_and_answers_as_the_offline_engine():
    from headrace import LLM, SamplingParams

    prompt = [5, 17, 99, 3, 250, 42]
    srv = ServerProcess("--model", "random:tiny-qwen2-moe", "--num-tokenizers", "1", "--seed", "3")
    try:
        srv.wait_ready()
        reply = srv.post("/v1/completions", json={"model": srv.get("/v1/models").json()["data"][0]["id"],
                                                  "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                  "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        served = reply.json()["choices"][0]
    finally:
        left = srv.stop()
        assert not left, f"processes left behind: {left}"
    llm = LLM(model="random:tiny-qwen2-moe", seed=3, log=lambda *_: None)
    offline = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert len(offline.token_ids) == 8 and served["text"] == offline.text
