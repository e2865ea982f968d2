"""An MoE model served end to end (api, tokenizer, scheduler, worker processes): its greedy tokens equal the
offline engine's on the same random weights."""

from __future__ import annotations

import pytest

from tests.headrace.server_process import served_greedy

pytestmark = pytest.mark.slow


def test_qwen2_moe_is_served_and_answers_as_the_offline_engine():
    from headrace import LLM, SamplingParams

    prompt = [5, 17, 99, 3, 250, 42]
    served, _ = served_greedy(prompt, "--model", "random:tiny-qwen2-moe", "--num-tokenizers", "1", "--seed", "3")
    llm = LLM(model="random:tiny-qwen2-moe", seed=3, log=lambda *_: None)
    offline = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert len(offline.token_ids) == 8 and served["text"] == offline.text
