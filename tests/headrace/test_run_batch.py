"""`headrace run-batch`: OpenAI Batch files in, one record per line out, as requests finish."""

from __future__ import annotations

import io
import json

import pytest

from headrace.cli import main
from headrace.llm import LLM
from headrace.run_batch import process_batch

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=256, num_blocks=128, device="cpu", log=lambda *_: None)


def line(custom_id, body, url=COMPLETIONS, method="POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def run(llm: LLM, lines: list[str]) -> list[dict]:
    out = io.StringIO()
    process_batch(llm, lines, out, use_tqdm=False)
    text = out.getvalue()
    assert text.endswith("\n")
    return [json.loads(r) for r in text.splitlines()]  # every line is one complete JSON record


def by_id(records: list[dict]) -> dict:
    return {r["custom_id"]: r for r in records}


def test_twenty_lines_with_one_malformed(llm):
    lines = []
    for i in range(19):
        if i % 2:
            lines.append(line(f"chat-{i}", {"model": "any", "max_completion_tokens": 8, "temperature": 0,
                                             "messages": [{"role": "user", "content": f"Count to {i}."}]}, CHAT))
        else:
            lines.append(line(f"cmpl-{i}", {"model": "any", "prompt": f"Fact number {i}:", "max_tokens": 8}))
    lines.insert(7, '{"custom_id": "broken", "method": "POST", "url"')
    records = run(llm, lines)
    assert len(records) == 20
    errors = [r for r in records if r["error"] is not None]
    assert len(errors) == 1 and errors[0]["response"] is None
    assert errors[0]["custom_id"] is None and errors[0]["error"]["code"] == "invalid_json"
    assert "line 8" in errors[0]["error"]["message"]
    ok = by_id([r for r in records if r["error"] is None])
    assert set(ok) == {f"chat-{i}" for i in range(1, 19, 2)} | {f"cmpl-{i}" for i in range(0, 19, 2)}
    assert len({r["id"] for r in records}) == 20 and all(r["id"].startswith("batch_req_") for r in records)
    for custom_id, r in ok.items():
        assert r["response"]["status_code"] == 200 and r["response"]["request_id"]
        body = r["response"]["body"]
        assert body["object"] == ("chat.completion" if custom_id.startswith("chat") else "text_completion")
        assert body["model"] == "SmolLM2-135M-Instruct"
        (choice,) = body["choices"]
        assert choice["finish_reason"] in ("stop", "length") and choice["index"] == 0
        text = choice["message"]["content"] if custom_id.startswith("chat") else choice["text"]
        assert isinstance(text, str) and text
        usage = body["usage"]
        assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 8
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_bad_requests_get_error_records_and_the_rest_run(llm):
    ok_body = {"prompt": "Hello", "max_tokens": 2}
    lines = [
        line("neg-temp", {"prompt": "Hi", "max_tokens": 4, "temperature": -1}),
        line("str-temp", {"prompt": "Hi", "temperature": "hot"}),
        line("top-p", {"prompt": "Hi", "top_p": 0}),
        line("no-prompt", {"max_tokens": 4}),
        line("bad-role", {"messages": [{"role": "wizard", "content": "hi"}]}, CHAT),
        line("too-long", {"prompt": "word " * 300}),
        line("over-context", {"prompt": "Hi", "max_tokens": 1000}),
        line("too-many-n", {"prompt": "Hi", "n": 99}),
        line("stream", {"prompt": "Hi", "stream": True}),
        line("scoring", {"prompt": "Hi", "echo": True, "logprobs": 1}),  # served by `headrace serve` only
        line("good", ok_body),
        line("good", ok_body),  # duplicate custom_id
        line("embeddings", {"input": "Hi"}, "/v1/embeddings"),
        line("get", ok_body, method="GET"),
        json.dumps({"custom_id": "no-body", "method": "POST", "url": COMPLETIONS}),
        json.dumps(["not", "an", "object"]),
        "",  # blank lines are skipped, not errors
    ]
    records = run(llm, lines)
    assert len(records) == 16
    for custom_id, param in [("neg-temp", "temperature"), ("str-temp", "temperature"), ("top-p", "top_p"),
                             ("no-prompt", "prompt"), ("bad-role", "messages.[0].role"), ("too-long", "prompt"),
                             ("over-context", "max_tokens"), ("too-many-n", "n"), ("stream", "stream"),
                             ("scoring", "echo")]:
        r = by_id(records)[custom_id]
        assert r["response"]["status_code"] == 400, custom_id
        error = r["response"]["body"]["error"]
        assert error["param"] == param and error["type"] == "BadRequestError", custom_id
        assert r["error"] == {"code": "invalid_request_error", "message": error["message"]}
    envelope = {r["error"]["code"] for r in records if r["response"] is None}
    assert envelope == {"duplicate_custom_id", "invalid_url", "invalid_method", "missing_required_parameter",
                        "invalid_request"}
    good = [r for r in records if r["custom_id"] == "good" and r["error"] is None]
    assert len(good) == 1 and good[0]["response"]["body"]["usage"]["completion_tokens"] == 2


def test_results_are_written_as_they_finish(llm):
    class Probe(io.StringIO):
        """Notes, at each flush, whether the engine still had work: proof the line went out early."""

        def __init__(self):
            super().__init__()
            self.engine_busy_at_flush: list[bool] = []

        def flush(self):
            self.engine_busy_at_flush.append(llm.engine.has_unfinished_requests())
            super().flush()

    lines = [line("long", {"prompt": "Tell me a story.", "max_tokens": 40, "ignore_eos": True})]
    lines += [line(f"short-{i}", {"prompt": f"Number {i}", "max_tokens": 1}) for i in range(3)]
    out = Probe()
    summary = process_batch(llm, lines, out, use_tqdm=False)
    assert (summary.total, summary.succeeded, summary.failed) == (4, 4, 0)
    records = [json.loads(r) for r in out.getvalue().splitlines()]
    assert [r["custom_id"] for r in records][-1] == "long"  # finish order, not input order
    assert out.engine_busy_at_flush[:3] == [True, True, True] and out.engine_busy_at_flush[-1] is False


def test_n_multi_prompt_echo_stop_and_logprobs(llm):
    lines = [
        line("multi", {"prompt": ["The sky is", "Water boils at"], "n": 2, "max_tokens": 3, "seed": 5}),
        line("echo", {"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0, "echo": True}),
        line("echo-ids", {"prompt": [504, 3575], "max_tokens": 1, "echo": True}),
        line("stop", {"prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0, "stop": [" 6"]}),
        line("lp", {"prompt": "Hello", "max_tokens": 3, "logprobs": 2}),
        line("chat-lp", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logprobs": True,
                         "top_logprobs": 2}, CHAT),
    ]
    records = by_id(run(llm, lines))
    multi = records["multi"]["response"]["body"]
    assert [c["index"] for c in sorted(multi["choices"], key=lambda c: c["index"])] == [0, 1, 2, 3]
    assert multi["usage"]["prompt_tokens"] == (len(llm.tokenizer.encode("The sky is"))
                                               + len(llm.tokenizer.encode("Water boils at")))
    assert multi["usage"]["completion_tokens"] == 12
    assert records["echo"]["response"]["body"]["choices"][0]["text"].startswith("The capital of France is ")
    assert records["echo-ids"]["response"]["body"]["choices"][0]["text"].startswith("The capital")
    stop = records["stop"]["response"]["body"]["choices"][0]
    assert stop["finish_reason"] == "stop" and stop["stop_reason"] == " 6" and " 6" not in stop["text"]
    lp = records["lp"]["response"]["body"]["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 3
    assert all(len(top) >= 2 for top in lp["top_logprobs"])
    content = records["chat-lp"]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(t["top_logprobs"]) == 2 for t in content)
    assert all(bytes(t["bytes"]).decode() == t["token"] for t in content)


def test_cli_run_batch(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(line("a", {"prompt": "Hello", "max_tokens": 2}) + "\n"
                   + line("b", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}, CHAT) + "\n"
                   + "not json\n")
    flags = ["--device", "cpu", "--max-model-len", "128", "--num-gpu-blocks-override", "32"]
    assert main(["run-batch", "-i", str(src), "-o", str(dst), *flags]) == 0
    records = by_id([json.loads(r) for r in dst.read_text().splitlines()])
    assert set(records) == {"a", "b", None}
    assert records["a"]["response"]["body"]["usage"]["completion_tokens"] == 2
    # Unusable paths fail before any model loads.
    assert main(["run-batch", "-i", str(tmp_path / "missing.jsonl"), "-o", str(dst), *flags]) == 1
    assert main(["run-batch", "-i", str(src), "-o", str(tmp_path / "no-dir" / "out.jsonl"), *flags]) == 1
