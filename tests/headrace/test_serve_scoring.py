"""Scoring requests end to end: a real `headrace serve` with chunked prefill (64-token steps: lm-eval's
batches of 16 prompts split across steps) and prefix caching answers echo + logprobs in OpenAI's shape and prompt_logprobs in vLLM's, equal to transformers'
float32 log-softmax on the same weights; and lm-eval (local-completions against this server) scores a
multiple-choice task exactly as lm-eval's own hf backend does on those weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.headrace.server_process import running_server

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The river ran past the old mill, under the stone bridge and out to the sea."
ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tests" / "fixtures" / "lm_eval"


@pytest.fixture(scope="module")
def server():
    # float32: the scores are checked against transformers in float32.
    with running_server("--max-model-len", "512", "--max-num-batched-tokens", "64", "--enable-prefix-caching",
                        "--dtype", "float32") as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(embedded_hf_model, embedded_tokenizer):
    """(prompt ids, transformers' float32 log-softmax at positions 0..P-2)."""
    ids = embedded_tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        logits = embedded_hf_model(torch.tensor([ids])).logits[0].float()
    return ids, logits.log_softmax(dim=-1)[:-1]


def complete(server, **body) -> dict:
    r = server.post("/v1/completions", json={"model": MODEL, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_with_logprobs_scores_the_prompt_in_openai_shape(server, reference):
    ids, lsm = reference
    body = complete(server, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
    choice = body["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and "".join(lp["tokens"]) == PROMPT
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    own = lsm.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), own, atol=2e-4, rtol=1e-4)
    for i, (token, top) in enumerate(zip(lp["tokens"][1:], lp["top_logprobs"][1:])):
        assert token in top and len(top) <= 3
        assert max(top.values()) == pytest.approx(lsm[i].max().item(), abs=2e-4)
    offsets = [0]
    for token in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp["text_offset"] == offsets


def test_prompt_logprobs_in_vllm_shape_and_the_output_unchanged(server, reference):
    ids, lsm = reference
    plain = complete(server, prompt=PROMPT, max_tokens=4)["choices"][0]
    choice = complete(server, prompt=PROMPT, max_tokens=4, prompt_logprobs=1)["choices"][0]
    assert choice["text"] == plain["text"] and choice["logprobs"] is None
    scores = choice["prompt_logprobs"]
    assert len(scores) == len(ids) and scores[0] is None
    for i, (tid, entry) in enumerate(zip(ids[1:], scores[1:])):
        mine = entry[str(tid)]
        assert mine["logprob"] == pytest.approx(lsm[i, tid].item(), abs=2e-4)
        assert mine["rank"] == int((lsm[i] > lsm[i, tid]).sum()) + 1
        top = min(entry.values(), key=lambda e: e["rank"])
        assert top["rank"] == 1 and top["logprob"] == pytest.approx(lsm[i].max().item(), abs=2e-4)


def test_streamed_echo_logprobs_equal_the_whole_response(server):
    whole = complete(server, prompt=PROMPT, echo=True, logprobs=1, max_tokens=3)["choices"][0]
    tokens, logprobs, text = [], [], ""
    with _stream(server, prompt=PROMPT, echo=True, logprobs=1, max_tokens=3) as chunks:
        for chunk in chunks:
            c = chunk["choices"][0]
            text += c["text"]
            if c["logprobs"]:
                tokens += c["logprobs"]["tokens"]
                logprobs += c["logprobs"]["token_logprobs"]
    assert text == whole["text"] and tokens == whole["logprobs"]["tokens"]
    assert logprobs == whole["logprobs"]["token_logprobs"]


class _stream:
    def __init__(self, server, **body):
        import httpx

        self._cm = httpx.stream("POST", server.base_url + "/v1/completions", timeout=120,
                                json={"model": MODEL, "temperature": 0, "stream": True, **body})

    def __enter__(self):
        r = self._cm.__enter__()
        assert r.status_code == 200
        return (json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {"))

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_max_tokens_zero_needs_a_scoring_field(server):
    r = server.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


@pytest.mark.timeout(1200)  # a server and two lm-eval runs: generous for a loaded shared CI machine
def test_lm_eval_local_completions_equals_its_hf_backend(server, embedded_source, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)  # the task's data_files path is relative to the repository root
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    tasks = TaskManager(include_path=str(TASKS))
    runs = {}
    for name, model, args in [
        ("server", "local-completions", f"model={MODEL},base_url={server.base_url}/v1/completions,"
                                        f"tokenizer={embedded_source.tokenizer_dir},max_retries=1"),
        ("hf", "hf", f"pretrained={embedded_source.weights_dir},tokenizer={embedded_source.tokenizer_dir},"
                     "dtype=float32,device=cpu"),
    ]:
        runs[name] = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["headrace_mc"], task_manager=tasks,
                                             batch_size=16, log_samples=True)
    acc = {name: run["results"]["headrace_mc"]["acc,none"] for name, run in runs.items()}
    assert acc["server"] == acc["hf"] and 0 < acc["hf"]
    # Stronger than equal accuracy: every choice's loglikelihood agrees.
    lls = {name: [[r[0] for r in s["filtered_resps"]] for s in sorted(run["samples"]["headrace_mc"],
                                                                       key=lambda s: s["doc_id"])]
           for name, run in runs.items()}
    assert len(lls["server"]) == 12
    for ours, theirs in zip(lls["server"], lls["hf"]):
        assert all(math.isclose(a, b, abs_tol=2e-3) for a, b in zip(ours, theirs)), (ours, theirs)
