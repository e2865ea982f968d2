"""Speculative decoding through the real server: 16 prompts x 128 greedy tokens served with n-gram drafts,
at once and beside requests that run without drafts (logprobs, a grammar), answer exactly what the
offline engine answers without speculation; /metrics counts the drafts. The same with the embedded model
drafting for itself (a draft model), seeded sampling included."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.headrace.server_process import running_server

pytestmark = pytest.mark.slow

PASSAGES = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "Water boils at one hundred degrees Celsius at sea level and at lower temperatures on mountains.",
    "for i in range(10):\n    total += values[i] * weights[i]\nprint(total)\n",
]
TASKS = ["Repeat the following text exactly:\n{p}\nText:", "Copy this passage word for word:\n{p}\nCopy:",
         "Rewrite the following without changing anything:\n{p}\nRewritten:", "Summarise:\n{p}\nSummary:"]
PROMPTS = [task.format(p=p) for task in TASKS for p in PASSAGES]  # 16
MAX_TOKENS = 128
# Served with speculation against the offline engine without: rows batched differently, which only the float
# path's results do not depend on (the embedded GGUF's default on a CPU is kept quantized; docs/cpu.md).
FLOAT32 = ("--dtype", "float32")


@pytest.mark.timeout(1500)
def test_served_with_ngram_speculation_equals_offline_without():
    from headrace import LLM, SamplingParams

    spec = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
                       "prompt_lookup_max": 4})
    with running_server("--max-model-len", "512", "--speculative-config", spec, "--num-tokenizers", "1",
                        *FLOAT32) as srv:
        model = srv.get("/v1/models").json()["data"][0]["id"]

        def complete(body: dict) -> dict:
            # A long timeout: 19 requests of 128 tokens on a CPU shared with other jobs.
            reply = httpx.post(srv.base_url + "/v1/completions", timeout=900,
                               json={"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                                     **body})
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]

        bodies = [{"prompt": p} for p in PROMPTS]
        bodies += [{"prompt": PROMPTS[0], "logprobs": 1}, {"prompt": PROMPTS[1], "logprobs": 2},
                   {"prompt": "Is water wet? Answer:", "guided_choice": ["yes", "no"], "max_tokens": 4,
                    "ignore_eos": False}]
        with ThreadPoolExecutor(len(bodies)) as pool:  # all at once: drafting and plain requests share steps
            served = list(pool.map(complete, bodies))
        time.sleep(1.0)  # the engine's counters reach the api every 0.5 s
        metrics = srv.get("/metrics").text

    llm = LLM(max_model_len=512, dtype="float32", log=lambda *_: None)
    offline = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    for i, (got, want) in enumerate(zip(served, offline)):
        assert got["text"] == want.outputs[0].text, f"prompt {i}"
    assert served[16]["text"] == offline[0].outputs[0].text and served[16]["logprobs"] is not None
    assert served[17]["text"] == offline[1].outputs[0].text
    assert served[18]["text"] in ("yes", "no")
    accepted = next(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("headrace:spec_decode_num_accepted_tokens_total"))
    drafts = next(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("headrace:spec_decode_num_drafts_total"))
    assert drafts > 0 and accepted > drafts  # more than one accepted draft token per verify step on average


# The draft-model test's size, prompts x tokens: 4 x 16 in CI (a draft as large as the target doubles every
# forward); the acceptance run sets HEADRACE_DRAFT_TEST_SIZE=16x128.
DRAFT_PROMPTS, DRAFT_TOKENS = map(int, os.environ.get("HEADRACE_DRAFT_TEST_SIZE", "4x16").split("x"))


def metric(metrics: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name))


@pytest.mark.timeout(1500)
def test_served_with_a_draft_model_equals_offline_without():
    """The embedded model drafting for itself (its own paged KV in the worker, drafts proposed in the verify
    step): greedy and seeded outputs are the offline engine's without speculation, beside requests that run
    without drafts, and every draft is accepted (a near-tie decided differently by the draft's batching may
    reject one)."""
    from headrace import LLM, SamplingParams

    spec = json.dumps({"method": "draft_model", "model": "embedded", "num_speculative_tokens": 4})
    n, prompts = DRAFT_TOKENS, PROMPTS[:: len(PROMPTS) // DRAFT_PROMPTS][:DRAFT_PROMPTS]
    with running_server("--max-model-len", "512", "--speculative-config", spec, "--num-tokenizers", "1",
                        *FLOAT32) as srv:
        model = srv.get("/v1/models").json()["data"][0]["id"]

        def complete(body: dict) -> dict:
            reply = httpx.post(srv.base_url + "/v1/completions", timeout=900,
                               json={"model": model, "max_tokens": n, "temperature": 0, "ignore_eos": True, **body})
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]

        bodies = [{"prompt": p} for p in prompts]
        bodies += [{"prompt": prompts[0], "logprobs": 1}, {"prompt": prompts[1], "temperature": 0.8, "seed": 7}]
        with ThreadPoolExecutor(len(bodies)) as pool:  # all at once: drafting and plain requests share steps
            served = list(pool.map(complete, bodies))
        time.sleep(1.0)
        metrics = srv.get("/metrics").text

    llm = LLM(max_model_len=512, dtype="float32", log=lambda *_: None)
    offline = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    seeded = llm.generate([prompts[1]], SamplingParams(temperature=0.8, seed=7, max_tokens=n, ignore_eos=True),
                          use_tqdm=False)
    for i, (got, want) in enumerate(zip(served, offline)):
        assert got["text"] == want.outputs[0].text, f"prompt {i}"
    with_logprobs, sampled = served[len(prompts):]
    assert with_logprobs["text"] == offline[0].outputs[0].text and with_logprobs["logprobs"] is not None
    assert sampled["text"] == seeded[0].outputs[0].text
    drafted = metric(metrics, "headrace:spec_decode_num_draft_tokens_total")
    accepted = metric(metrics, "headrace:spec_decode_num_accepted_tokens_total")
    assert drafted > 0 and accepted >= drafted - 2
