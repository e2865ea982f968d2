"""GET /metrics and the request log: an api over real HTTP with the peers played here, and the multiprocess
merge of several api processes' files."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from headrace.common.messages import EngineStats, ErrorInfo, RequestTimings, TextDelta
from headrace.services.api.metrics import Metrics, one_two_five_buckets, usage_tokens
from headrace.services.api.records import RequestRecord
from tests.services.api.fakes import delta, until

pytestmark = pytest.mark.anyio
MODEL = "SmolLM2-135M-Instruct"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Exposition text -> {(sample name, sorted labels): value}; the parser rejects malformed text."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed: dict, name: str, **labels: str) -> float:
    return parsed[(name, tuple(sorted({"model_name": MODEL, **labels}.items())))]


# The phases the engine reports for every request (binary fractions: their sums are exact).
PHASES = {"ingest": 0.0078125, "queue": 0.25, "prefill": 0.125, "decode": 0.5}


def scripted(req) -> list[list[TextDelta]]:
    """Three tokens (the first two arriving together), one preemption and the request's phases from the
    engine: ingest, queue and prefill with the first token; ingest and queue again, decode and inference
    with the last (as the scheduler sends them)."""
    last = 2
    first = RequestTimings(ingest=PHASES["ingest"], queue=PHASES["queue"], prefill=PHASES["prefill"])
    final = RequestTimings(ingest=PHASES["ingest"], queue=PHASES["queue"], decode=PHASES["decode"],
                           inference=PHASES["prefill"] + PHASES["decode"])
    return [[delta(req.req_id, "a", 0, 3, prompt_tokens=4, timings=first),
             delta(req.req_id, "b", 1, 3, prompt_tokens=4, num_preemptions=1)],
            [delta(req.req_id, "c", last, 3, finish_reason="stop", prompt_tokens=4, num_preemptions=1,
                   timings=final)]]


async def test_metrics_count_every_finished_request_and_match_usage(stack, caplog):
    caplog.set_level(logging.INFO, logger="headrace.api.requests")
    await stack.add_tokenizer(scripted)
    await stack.ready()
    await until(lambda: stack.client.stats is not None)
    usages = []
    bodies = [({"prompt": "x"}, "/v1/completions"),
              ({"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}, "/v1/completions"),
              ({"prompt": [[1, 2], [3, 4, 5]], "n": 2}, "/v1/completions"),  # 2 prompts x 2 choices
              ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, "/v1/chat/completions")]
    for k, (body, path) in enumerate(bodies):
        r = await stack.http.post(path, json=body, headers={"X-Request-Id": f"client-{k}"})
        assert r.status_code == 200, r.text
        if body.get("stream"):
            usages.append(json.loads(r.text.split("data: ")[-2])["usage"])
        else:
            usages.append(r.json()["usage"])
    engine_requests = 1 + 1 + 4 + 3

    r = await stack.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = samples(r.text)
    # Token counters equal what the responses reported (a prompt counts once for its n choices).
    assert value(m, "headrace:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages) == 4 + 4 + 8 + 4
    assert value(m, "headrace:generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    # Everything else is per engine request.
    assert value(m, "headrace:request_success_total", finished_reason="stop") == engine_requests
    assert value(m, "headrace:request_success_total", finished_reason="abort") == 0
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_ingest_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_inference_time_seconds", "request_prompt_tokens", "request_generation_tokens"):
        assert value(m, f"headrace:{name}_count") == engine_requests, name
    assert value(m, "headrace:inter_token_latency_seconds_count") == 2 * engine_requests  # 3 tokens: 2 gaps
    # Sent twice (ingest, queue) or once: each observed once per request, with the engine's value.
    for phase, seconds in PHASES.items():
        assert value(m, f"headrace:request_{phase}_time_seconds_sum") == seconds * engine_requests, phase
    assert value(m, "headrace:request_inference_time_seconds_sum") == (
        (PHASES["prefill"] + PHASES["decode"]) * engine_requests)
    assert value(m, "headrace:request_ingest_time_seconds_bucket", le="0.01") == engine_requests  # fine buckets
    assert value(m, "headrace:request_ingest_time_seconds_bucket", le="0.005") == 0
    assert value(m, "headrace:request_generation_tokens_sum") == 3 * engine_requests
    assert value(m, "headrace:request_prompt_tokens_bucket", le="5.0") == engine_requests
    assert value(m, "headrace:request_prompt_tokens_bucket", le="2.0") == 0
    assert value(m, "headrace:num_preemptions_total") == engine_requests
    # The engine gauges follow EngineStats (the fake scheduler reports one running request).
    assert value(m, "headrace:num_requests_running", replica="0") == 1
    assert value(m, "headrace:num_requests_waiting", replica="0") == 0
    assert value(m, "headrace:kv_cache_usage_perc", replica="0") == 0
    # The prefix cache's counters are the engine's totals (the fake reports 40 tokens looked up, 16 found).
    assert value(m, "headrace:prefix_cache_queries_total", replica="0") == 40
    assert value(m, "headrace:prefix_cache_hits_total", replica="0") == 16

    lines = [rec.getMessage() for rec in caplog.records if rec.name == "headrace.api.requests"]
    assert len(lines) == len(bodies)
    chat = next(line for line in lines if "request_id=client-3 " in line)
    fields = dict(part.split("=", 1) for part in chat.split()[1:])
    assert fields["engine_request_ids"].count(",") == 2 and fields["engine_request_ids"].startswith("chatcmpl-")
    assert (fields["model"], fields["prompt_tokens"], fields["generation_tokens"]) == (MODEL, "4", "9")
    assert fields["finish_reason"] == "stop,stop,stop"
    assert float(fields["ttft_s"]) <= float(fields["e2e_s"]) and float(fields["queue_s"]) == 0.25


async def test_failed_and_aborted_requests_count_by_reason(stack, caplog):
    caplog.set_level(logging.INFO, logger="headrace.api.requests")

    def script(req):
        if req.prompt == "too long":
            info = ErrorInfo("the prompt is too long.", "BadRequestError", "prompt", 400)
            return [[TextDelta(req.req_id, finished=True, finish_reason="error", error=info)]]
        return [[delta(req.req_id, "one", 0, 5)]]  # never finishes

    tok = await stack.add_tokenizer(script)
    assert (await stack.http.post("/v1/completions", json={"prompt": "too long"})).status_code == 400
    async with stack.http.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True},
                                 headers={"X-Request-Id": "leaver"}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                break  # hang up mid-stream
    await tok.wait_aborted()
    await until(lambda: any("request_id=leaver " in rec.getMessage() for rec in caplog.records))
    m = samples((await stack.http.get("/metrics")).text)
    assert value(m, "headrace:request_success_total", finished_reason="error") == 1
    assert value(m, "headrace:request_success_total", finished_reason="abort") == 1
    assert value(m, "headrace:request_success_total", finished_reason="stop") == 0
    assert value(m, "headrace:time_to_first_token_seconds_count") == 1  # the failed one had no token
    assert value(m, "headrace:e2e_request_latency_seconds_count") == 2
    assert value(m, "headrace:generation_tokens_total") == 1
    leaver = next(rec.getMessage() for rec in caplog.records if "request_id=leaver " in rec.getMessage())
    assert "finish_reason=abort" in leaver and "generation_tokens=1" in leaver


async def test_a_score_only_request_generates_nothing_in_usage_or_metrics(stack):
    """max_tokens 0 (echo with logprobs): the engine samples one token to score the prompt; the response
    drops it, and the token counters count as the usage does."""
    await stack.add_tokenizer(lambda req: [[delta(req.req_id, "a", 0, 1, finish_reason="length",
                                                  prompt_tokens=4)]])
    await stack.ready()
    r = await stack.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 0, "echo": True,
                                                       "logprobs": 1})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 0
    m = samples((await stack.http.get("/metrics")).text)
    assert value(m, "headrace:generation_tokens_total") == 0
    assert value(m, "headrace:request_generation_tokens_sum") == 0
    assert value(m, "headrace:prompt_tokens_total") == 4


def test_token_buckets_and_usage_counting():
    assert one_two_five_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert one_two_five_buckets(1024)[-3:] == [200, 500, 1000]
    records = [RequestRecord(f"r-{k}", 0.0, num_prompt_tokens=p, num_output_tokens=o)
               for k, (p, o) in enumerate([(5, 1), (5, 2), (0, 0), (7, 3)])]
    assert usage_tokens(records, 2) == (5 + 7, 6)  # a choice that failed early has no prompt count
    assert usage_tokens(records, 1) == (17, 6)


# One api process: observe `count` finished requests of 2 prompt + 3 generated tokens, then report
# `running` requests from the engine. It writes into PROMETHEUS_MULTIPROC_DIR and exits.
_API_PROCESS = textwrap.dedent("""
    import sys
    from headrace.common.messages import EngineStats, TextDelta
    from headrace.services.api.metrics import Metrics
    from headrace.services.api.records import HttpRequest, RequestRecord

    count, running = int(sys.argv[1]), int(sys.argv[2])
    metrics = Metrics("m", 1024)
    for k in range(count):
        record = RequestRecord(f"r-{k}", arrival=0.0)
        record.on_delta(TextDelta(f"r-{k}", token_ids=[1, 2, 3], finished=True, finish_reason="length",
                                  num_prompt_tokens=2, num_output_tokens=3), 0.5)
        metrics.observe([record], HttpRequest(f"h-{k}"))
    metrics.on_stats(EngineStats(num_running=running))
""")


def test_several_api_processes_merge_into_one_view(tmp_path, monkeypatch):
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[3])}
    for count, running in ((3, 7), (2, 4)):  # the second process reports last
        subprocess.run([sys.executable, "-c", _API_PROCESS, str(count), str(running)], env=env, check=True)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    scraped = Metrics("m")
    scraped.on_stats(EngineStats(prefix_cache_queries=9, prefix_cache_hits=3))  # engine totals: not summed
    m = {(name, dict(labels).get("finished_reason"), dict(labels).get("le")): v
         for (name, labels), v in samples(scraped.render().decode()).items()}
    assert m[("headrace:prefix_cache_queries_total", None, None)] == 9
    assert m[("headrace:prefix_cache_hits_total", None, None)] == 3
    assert m[("headrace:request_success_total", "length", None)] == 5  # summed over processes
    assert m[("headrace:prompt_tokens_total", None, None)] == 10
    assert m[("headrace:generation_tokens_total", None, None)] == 15
    assert m[("headrace:e2e_request_latency_seconds_count", None, None)] == 5
    assert m[("headrace:e2e_request_latency_seconds_bucket", None, "0.5")] == 5
    assert m[("headrace:e2e_request_latency_seconds_bucket", None, "0.3")] == 0
    assert m[("headrace:num_requests_running", None, None)] == 4  # the newest write, not a sum


def test_engine_gauges_and_prefix_counters_carry_the_replica():
    metrics = Metrics(MODEL)
    metrics.on_stats(EngineStats(num_running=2, kv_cache_usage=0.25, prefix_cache_queries=10, prefix_cache_hits=4))
    metrics.on_stats(EngineStats(num_running=5, num_waiting=1, prefix_cache_queries=30, prefix_cache_hits=20,
                                 data_parallel_rank=1))
    m = samples(metrics.render().decode())
    assert value(m, "headrace:num_requests_running", replica="0") == 2
    assert value(m, "headrace:num_requests_running", replica="1") == 5
    assert value(m, "headrace:num_requests_waiting", replica="1") == 1
    assert value(m, "headrace:kv_cache_usage_perc", replica="0") == 0.25
    assert value(m, "headrace:prefix_cache_hits_total", replica="0") == 4
    assert value(m, "headrace:prefix_cache_queries_total", replica="1") == 30


def test_spec_decode_counters_are_the_engine_totals_by_position():
    m = Metrics(MODEL)
    m.on_stats(EngineStats(spec_num_drafts=4, spec_num_draft_tokens=12, spec_num_accepted_tokens=7,
                           spec_accepted_per_pos=[4, 2, 1]))
    parsed = samples(m.render().decode())
    assert value(parsed, "headrace:spec_decode_num_drafts_total", replica="0") == 4
    assert value(parsed, "headrace:spec_decode_num_draft_tokens_total", replica="0") == 12
    assert value(parsed, "headrace:spec_decode_num_accepted_tokens_total", replica="0") == 7
    assert [value(parsed, "headrace:spec_decode_num_accepted_tokens_per_pos_total", replica="0", position=str(p))
            for p in range(3)] == [4, 2, 1]
