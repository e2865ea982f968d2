"""`headrace bench serve` end to end against a scripted OpenAI-shaped SSE server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from headrace.bench import serve

SERVER_PROMPT_TOKENS = 1234  # what the scripted server's usage reports, to tell it from client counts


class ScriptedServer:
    """Streams `max_tokens` chunks of " tok" at a fixed pace; request number k (in arrival order) fails with
    HTTP 500 when k is in `http_failures`, or with an SSE error event after one token when in `stream_failures`."""

    def __init__(self, send_usage: bool = True, http_failures=(), stream_failures=(), metrics: str | None = None):
        self.send_usage = send_usage
        self.metrics_scrapes = 0
        self.http_failures, self.stream_failures = set(http_failures), set(stream_failures)
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.model_listings = 0
        self.in_flight = self.peak_in_flight = 0
        self.app = FastAPI()
        self.app.get("/v1/models")(self.models)
        self.app.post("/v1/completions")(self.generate)
        self.app.post("/v1/chat/completions")(self.generate)
        if metrics is not None:  # another server's Prometheus text

            async def metrics_page():
                self.metrics_scrapes += 1
                return PlainTextResponse(metrics)

            self.app.get("/metrics")(metrics_page)

    async def models(self):
        self.model_listings += 1
        return {"object": "list", "data": [{"id": "scripted-model", "object": "model", "root": "scripted"}]}

    async def generate(self, request: Request):
        body = await request.json()
        k = len(self.bodies)
        self.bodies.append(body)
        self.auth.append(request.headers.get("authorization"))
        if k in self.http_failures:
            return JSONResponse({"error": {"message": "scripted overload", "type": "server_error"}}, 500)
        chat = "messages" in body
        n = body.get("max_completion_tokens") or body.get("max_tokens")
        usage = self.send_usage and body.get("stream_options", {}).get("include_usage")
        return StreamingResponse(self.stream(k, chat, n, usage), media_type="text/event-stream")

    async def stream(self, k: int, chat: bool, n: int, usage: bool):
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            def event(payload: dict) -> str:
                return f"data: {json.dumps(payload)}\n\n"

            def chunk(text, finish=None):
                choice = ({"index": 0, "delta": {"content": text}, "finish_reason": finish} if chat
                          else {"index": 0, "text": text, "finish_reason": finish})
                return event({"id": f"r{k}", "choices": [choice]})

            await asyncio.sleep(0.02)  # "prefill"
            if chat:  # the role preamble carries no token
                yield event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            yield ": keep-alive comment\n\n"
            for i in range(n):
                if i:
                    await asyncio.sleep(0.003)
                yield chunk(" tok")
                if k in self.stream_failures:
                    yield event({"error": {"message": "worker died", "code": 500}})
                    return
            yield chunk("", finish="length")  # bare finish marker: no token
            if usage:
                yield event({"choices": [], "usage": {"prompt_tokens": SERVER_PROMPT_TOKENS, "completion_tokens": n,
                                                      "total_tokens": SERVER_PROMPT_TOKENS + n}})
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1


@pytest.fixture
def run_server():
    running = []

    def start(scripted: ScriptedServer) -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(scripted.app, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        running.append((server, thread, sock))
        for _ in range(500):
            if server.started:
                break
            time.sleep(0.01)
        assert server.started, "scripted server did not start"
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for server, thread, sock in running:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def tokenizer_dir(embedded_source):
    return embedded_source.tokenizer_dir


def test_completions_run_at_a_rate_writes_vllm_shaped_json(tmp_path, run_server, tokenizer_dir, capsys):
    scripted = ScriptedServer(http_failures={3}, stream_failures={6})
    url = run_server(scripted)
    rc = serve.main([
        "--base-url", url, "--tokenizer", tokenizer_dir, "--dataset-name", "random", "--num-prompts", "10",
        "--random-input-len", "32", "--random-output-len", "6", "--request-rate", "40", "--seed", "5",
        "--api-key", "secret", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99.9",
        "--goodput", "ttft:1e9", "e2el:1e9", "--save-result", "--result-dir", str(tmp_path / "out"),
        "--result-filename", "run.json", "--disable-tqdm"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Request goodput (req/s):" in printed
    assert "Server-side" not in printed  # no /metrics here: nothing said about it

    # The client sent exactly num_prompts streamed requests, shaped as vLLM's client shapes them.
    assert scripted.model_listings == 1 and len(scripted.bodies) == 10
    for body in scripted.bodies:
        assert body["model"] == "scripted-model" and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}
        assert body["max_tokens"] == 6 and body["ignore_eos"] is True  # random dataset implies ignore_eos
        assert isinstance(body["prompt"], str)
    assert scripted.auth == ["Bearer secret"] * 10

    result = json.loads((tmp_path / "out" / "run.json").read_text())
    assert result["backend"] == "openai" and result["model_id"] == "scripted-model"
    assert "server_means_ms" not in result
    assert result["tokenizer_id"] == tokenizer_dir
    assert (result["num_prompts"], result["request_rate"], result["burstiness"], result["max_concurrency"]) == (
        10, 40.0, 1.0, None)
    assert (result["completed"], result["failed"]) == (8, 2)
    errors = [e for e in result["errors"] if e]
    assert len(errors) == 2
    assert any("HTTP 500" in e and "scripted overload" in e for e in errors)
    assert any("stream error" in e and "worker died" in e for e in errors)

    ok = [i for i, e in enumerate(result["errors"]) if not e]
    for key in ("input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times", "generated_texts"):
        assert len(result[key]) == 10, key
    for i in ok:
        assert result["output_lens"][i] == 6  # from the usage chunk
        assert result["input_lens"][i] == SERVER_PROMPT_TOKENS  # the server's count wins over the client's
        assert result["generated_texts"][i] == " tok" * 6
        assert len(result["itls"][i]) == 5  # one gap per token chunk after the first; no preamble/finish/usage
        assert result["ttfts"][i] > 0 and result["latencies"][i] >= result["ttfts"][i]
    assert result["total_output_tokens"] == 8 * 6
    assert result["total_input_tokens"] == 8 * SERVER_PROMPT_TOKENS
    assert result["request_throughput"] == pytest.approx(8 / result["duration"])
    assert result["output_throughput"] == pytest.approx(48 / result["duration"])
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])  # SLOs nobody misses
    assert 1 <= result["max_concurrent_requests"] <= 10

    # The summaries are the math of the per-request lists.
    tpots = [(result["latencies"][i] - result["ttfts"][i]) / 5 * 1000 for i in ok]
    itls = [g * 1000 for i in ok for g in result["itls"][i]]
    assert result["mean_tpot_ms"] == pytest.approx(np.mean(tpots))
    assert result["p99.9_itl_ms"] == pytest.approx(np.percentile(itls, 99.9))
    assert result["median_ttft_ms"] == pytest.approx(np.median([result["ttfts"][i] * 1000 for i in ok]))
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p99.9"):
            assert isinstance(result[f"{stat}_{metric}_ms"], float), (stat, metric)


VLLM_METRICS = ("# TYPE vllm:time_to_first_token_seconds histogram\n"
                'vllm:time_to_first_token_seconds_count{model_name="m"} 3.0\n'
                'vllm:time_to_first_token_seconds_sum{model_name="m"} 0.5\n')


def test_chat_without_usage_counts_by_tokenizer_and_caps_concurrency(tmp_path, run_server, tokenizer_dir,
                                                                    embedded_tokenizer, capsys):
    scripted = ScriptedServer(send_usage=False, metrics=VLLM_METRICS)  # /metrics, but not a headrace server's
    url = run_server(scripted)
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Question {i}?", "output_len": 3 + i}) for i in range(4)))
    host, port = url.removeprefix("http://").split(":")
    rc = serve.main([
        "--host", host, "--port", port, "--endpoint", "/v1/chat/completions", "--model", "named-model",
        "--tokenizer", tokenizer_dir, "--dataset-name", "jsonl", "--dataset-path", str(data),
        "--num-prompts", "6", "--max-concurrency", "2", "--save-result", "--result-dir", str(tmp_path),
        "--label", "mylabel", "--disable-tqdm"])
    assert rc == 0
    assert scripted.model_listings == 0 and len(scripted.bodies) == 6
    assert scripted.peak_in_flight <= 2
    for body in scripted.bodies:
        assert body["model"] == "named-model" and "ignore_eos" not in body
        assert body["messages"][0]["role"] == "user" and body["messages"][0]["content"].startswith("Question")
        assert body["max_completion_tokens"] in (3, 4, 5, 6)

    (path,) = tmp_path.glob("mylabel-infqps-concurrency2-named-model-*.json")
    result = json.loads(path.read_text())
    assert result["backend"] == "openai-chat" and result["completed"] == 6 and result["max_concurrency"] == 2
    assert result["max_concurrent_requests"] <= 2
    assert result["request_goodput"] is None
    for text, n, itl in zip(result["generated_texts"], result["output_lens"], result["itls"]):
        assert text == " tok" * (len(itl) + 1)  # the role preamble is not a token
        assert n == len(embedded_tokenizer.encode(text, add_special_tokens=False))
    assert "p99_ttft_ms" in result and "p99_e2el_ms" not in result  # default --percentile-metrics
    assert scripted.metrics_scrapes == 1 and "server_means_ms" not in result  # looked once, skipped silently
    assert "Server-side" not in capsys.readouterr().out


def test_unreachable_server_fails_every_request_without_crashing(tmp_path, tokenizer_dir, capsys):
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = serve.main(["--port", str(port), "--model", "m", "--tokenizer", tokenizer_dir, "--num-prompts", "3",
                     "--random-input-len", "8", "--random-output-len", "2", "--disable-tqdm", "--save-result",
                     "--result-filename", str(tmp_path / "r.json")])
    assert rc == 1
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["completed"], result["failed"]) == (0, 3)
    assert all("ConnectError" in e for e in result["errors"])
    assert "Failed requests:" in capsys.readouterr().out


def test_bad_flags_and_inputs_are_reported_not_raised(tmp_path, tokenizer_dir, capsys):
    assert serve.main(["--percentile-metrics", "ttft,latency"]) == 2
    assert serve.main(["--goodput", "itl:5"]) == 2
    assert serve.main(["--endpoint", "/v1/embeddings"]) == 2
    assert serve.main(["--dataset-path", "x.jsonl"]) == 2
    assert serve.main(["--tokenizer", str(tmp_path / "no-such-tokenizer")]) == 2
    assert serve.main(["--tokenizer", tokenizer_dir, "--dataset-name", "jsonl",
                       "--dataset-path", str(tmp_path / "missing.jsonl")]) == 2
    assert "headrace bench serve:" in capsys.readouterr().out


def test_arrival_times_are_seeded_and_keep_the_offered_rate():
    assert serve.arrival_times(4, float("inf"), 1.0, np.random.default_rng(0)) == [0.0] * 4
    a = serve.arrival_times(50, 10.0, 1.0, np.random.default_rng(1))
    assert a == serve.arrival_times(50, 10.0, 1.0, np.random.default_rng(1))
    assert a != serve.arrival_times(50, 10.0, 1.0, np.random.default_rng(2))
    assert all(x < y for x, y in zip(a, a[1:])) and a[-1] == pytest.approx(5.0)
    uniform = serve.arrival_times(4, 2.0, float("inf"), np.random.default_rng(0))
    assert uniform == pytest.approx([0.5, 1.0, 1.5, 2.0])
    # Burstier traffic (small gamma shape) spreads its gaps far more than near-uniform traffic.
    bursty = np.diff(serve.arrival_times(400, 10.0, 0.2, np.random.default_rng(0)))
    smooth = np.diff(serve.arrival_times(400, 10.0, 20.0, np.random.default_rng(0)))
    assert bursty.std() > 3 * smooth.std()


def test_token_text_skips_chunks_that_carry_no_token():
    assert serve.token_text({"choices": [], "usage": {"completion_tokens": 3}}, chat=False) is None
    assert serve.token_text({"choices": [{"text": "", "finish_reason": "stop"}]}, chat=False) is None
    assert serve.token_text({"choices": [{"text": "", "finish_reason": None}]}, chat=False) == ""
    assert serve.token_text({"choices": [{"text": "hi", "finish_reason": "length"}]}, chat=False) == "hi"
    assert serve.token_text({"choices": [{"delta": {"role": "assistant", "content": ""}}]}, chat=True) is None
    assert serve.token_text({"choices": [{"delta": {"role": "assistant", "content": "Hey"}}]}, chat=True) == "Hey"
    assert serve.token_text({"choices": [{"delta": {"reasoning_content": "hmm"}}]}, chat=True) == "hmm"
