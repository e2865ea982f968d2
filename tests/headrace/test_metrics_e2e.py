"""End to end: /metrics of a real `headrace serve` with two api processes agrees with `headrace bench serve`,
and a client that leaves mid-stream is counted as aborted and stops counting as running."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from headrace.bench import serve as bench_serve
from tests.headrace.server_process import ServerProcess

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
WAIT_S = 30.0  # a guard against hangs only


def scrape(server: ServerProcess) -> dict[tuple[str, str | None], float]:
    """{(sample name, finished_reason label or None): value} of the model's series."""
    out = {}
    for family in text_string_to_metric_families(server.get("/metrics").text):
        for s in family.samples:
            if s.labels.get("model_name") == MODEL and "le" not in s.labels:
                out[(s.name, s.labels.get("finished_reason"))] = s.value
    return out


def poll(server: ServerProcess, done) -> dict:
    deadline = time.monotonic() + WAIT_S
    while True:
        metrics = scrape(server)
        if done(metrics) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.2)


PHASES = ("request_ingest_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
          "request_inference_time_seconds")


def check_phases(m: dict) -> None:
    """The phases' sums against each other and the api's own TTFT and e2e (sums over the same 20 requests)."""
    total = {name: m[(f"headrace:{name}_sum", None)] for name in (
        *PHASES, "request_queue_time_seconds", "time_to_first_token_seconds", "e2e_request_latency_seconds")}
    ingest, prefill, decode, inference = (total[name] for name in PHASES)
    queue, ttft, e2e = (total[name] for name in (
        "request_queue_time_seconds", "time_to_first_token_seconds", "e2e_request_latency_seconds"))
    assert ingest > 0 and prefill > 0 and decode > 0 and queue >= 0
    # Per request, inference is prefill + decode from the same three timestamps.
    assert inference == pytest.approx(prefill + decode, rel=1e-6)
    # Every phase sits inside the api's own window: arrival .. first token .. finish (plus the way back).
    assert ingest + queue + prefill < ttft
    assert ingest + queue + inference < e2e


def check_server_means(result: dict, m: dict, printed: str) -> None:
    """`headrace bench serve` saw a headrace server: its server-side means are this run's exact means."""
    means = result["server_means_ms"]
    assert set(means) == {"ttft", "ingest", "queue", "prefill", "decode", "e2e", "itl"}
    for key, name in (("ttft", "time_to_first_token_seconds"), ("prefill", "request_prefill_time_seconds"),
                      ("e2e", "e2e_request_latency_seconds"), ("itl", "inter_token_latency_seconds")):
        # A fresh server: before the run every count was 0.
        exact = m[(f"headrace:{name}_sum", None)] / m[(f"headrace:{name}_count", None)] * 1000
        assert means[key] == pytest.approx(exact), key
    assert all(v is not None and v >= 0 for v in means.values()), means
    # The client's view wraps the server's: it sends before the api's arrival and reads after its first token.
    assert result["mean_ttft_ms"] > means["ttft"] > means["ingest"] + means["queue"] + means["prefill"]
    assert result["mean_e2el_ms"] > means["e2e"]
    assert "Server-side (from /metrics)" in printed and "Requests observed:" in printed
    assert re.search(r"Requests observed:\s+20\b", printed)


def test_metrics_agree_with_the_benchmark_and_disconnects(tmp_path, capsys):
    server = ServerProcess("--api-server-count", "2", "--max-model-len", "1024")
    try:
        server.wait_ready()
        assert bench_serve.main([
            "--base-url", server.base_url, "--dataset-name", "random", "--num-prompts", "20",
            "--random-input-len", "32", "--random-output-len", "8", "--save-result", "--result-dir",
            str(tmp_path), "--result-filename", "run.json", "--disable-tqdm"]) == 0
        result = json.loads((tmp_path / "run.json").read_text())
        assert result["completed"] == 20
        printed = capsys.readouterr().out
        print(printed)  # the server-side block, for the record (pytest -s)

        m = scrape(server)
        assert m[("headrace:request_success_total", "length")] == 20  # random prompts run with ignore_eos
        assert m[("headrace:prompt_tokens_total", None)] == result["total_input_tokens"]
        assert m[("headrace:generation_tokens_total", None)] == result["total_output_tokens"] == 20 * 8
        for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                     *PHASES):
            assert m[(f"headrace:{name}_count", None)] == 20, name  # once per request, none counted twice
        assert m[("headrace:inter_token_latency_seconds_count", None)] == 20 * 7
        check_phases(m)
        check_server_means(result, m, printed)
        # Both api processes served some of the 20 connections: the counters above are their merged sum.
        served_by = {match for match in re.findall(r"api-(\d+) INFO finished ", server.output)}
        assert served_by == {"0", "1"}, server.output[-3000:]

        with httpx.stream("POST", server.base_url + "/v1/completions", timeout=60,
                          headers={"X-Request-Id": "leaves-early"},
                          json={"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 900,
                                "ignore_eos": True, "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 3:
                    break  # leave mid-stream
        # The engine gauges are the scheduler's snapshot every 0.5 s: one taken while the request still
        # queued (waiting 1, running 0) can outlive the whole short request, so wait for both to read 0.
        m = poll(server, lambda m: m[("headrace:request_success_total", "abort")] == 1
                 and m[("headrace:num_requests_running", None)] == 0
                 and m[("headrace:num_requests_waiting", None)] == 0
                 and "request_id=leaves-early " in server.output)
        assert m[("headrace:request_success_total", "abort")] == 1
        assert m[("headrace:num_requests_running", None)] == 0
        assert m[("headrace:num_requests_waiting", None)] == 0
        line = next(line for line in server.lines if "request_id=leaves-early " in line)
        assert "finish_reason=abort" in line and f"model={MODEL} " in line
    finally:
        left = server.stop()
        assert not left, f"processes left behind: {left}"
