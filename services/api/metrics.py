"""GET /metrics (Prometheus, vLLM's names under `headrace:`) and one log line per finished request.

Engine gauges (running, waiting, KV usage) and the prefix cache's counters mirror the scheduler's
EngineStats, which every api instance receives, so every instance reports the same values. They carry a
`replica` label (the data-parallel rank, "0" with one replica): each replica's scheduler sends its own. The
per-request counters and histograms carry no replica label: the api does not learn which replica served a
request (the tokenizer chose it), and sums over replicas are what their dashboards plot. Counters and
histograms are per request: an instance observes the requests it served, when they finish, so token
counters add up to the usage the responses reported (the engine's own counters would also count tokens no
response reported: a stop string's tail, one prompt prefilled once per choice).

With --api-server-count M, the instances are separate processes behind one port and a scrape reaches any
one of them. So when PROMETHEUS_MULTIPROC_DIR is set (the launcher sets a fresh one for its children),
prometheus_client keeps each process's values in files there and /metrics merges them: counters and
histograms summed over processes, the engine gauges taking the most recent value. The variable must be set
before the process imports prometheus_client. Without it (one api process, tests), one in-memory registry.
"""

from __future__ import annotations

import json
import logging
import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from headrace.common.messages import EngineStats
from headrace.services.api.records import HttpRequest, RequestRecord

request_log = logging.getLogger("headrace.api.requests")

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
FINISH_REASONS = ("stop", "length", "abort", "error")

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards built for it read ours the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
DEFAULT_MAX_TOKENS = 1 << 20  # token-count buckets' range when the context length is not known here


def one_two_five_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value: token-count buckets sized to the context length."""
    buckets, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return buckets
            buckets.append(m * scale)
        scale *= 10


def usage_tokens(records: list[RequestRecord], n: int) -> tuple[int, int]:
    """(prompt, completion) tokens as the response's usage counts them: each prompt once for its n choices."""
    prompt = sum(max(r.num_prompt_tokens for r in records[p:p + n]) for p in range(0, len(records), n))
    return prompt, sum(r.num_output_tokens for r in records)


class ReplicaTotals:
    """The engine's latest cumulative totals per replica, as each replica's scheduler sends them. They are the
    same in every api instance, so they are not summed over processes: the instance a scrape reaches reports
    the latest totals it received, per replica."""

    def __init__(self, model_name: str, registry: CollectorRegistry):
        self.model_name = model_name
        self.by_replica: dict[int, EngineStats] = {0: EngineStats()}
        registry.register(self)

    @property
    def stats(self) -> EngineStats:
        return self.by_replica[min(self.by_replica)]

    @stats.setter
    def stats(self, stats: EngineStats) -> None:
        self.by_replica[stats.data_parallel_rank] = stats

    def _family(self, name: str, doc: str, field: str) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=["model_name", "replica"])
        for replica, stats in sorted(self.by_replica.items()):
            family.add_metric([self.model_name, str(replica)], getattr(stats, field))
        return family


class PrefixCacheCounters(ReplicaTotals):
    """vLLM's prefix-cache counters (prompt tokens looked up, and found) as each replica's scheduler counts them."""

    def collect(self):
        yield self._family("headrace:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                           "prefix_cache_queries")
        yield self._family("headrace:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                           "prefix_cache_hits")


class SpecDecodeCounters(ReplicaTotals):
    """vLLM's speculative-decoding counters (spec_decode_num_drafts, _num_draft_tokens, _num_accepted_tokens,
    _num_accepted_tokens_per_pos by draft position), per replica. The mean acceptance length is
    1 + accepted_tokens / drafts; the acceptance rate accepted_tokens / draft_tokens."""

    def collect(self):
        yield self._family("headrace:spec_decode_num_drafts", "Verify steps of a request that carried draft tokens.",
                           "spec_num_drafts")
        yield self._family("headrace:spec_decode_num_draft_tokens", "Draft tokens proposed.", "spec_num_draft_tokens")
        yield self._family("headrace:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                           "spec_num_accepted_tokens")
        family = CounterMetricFamily("headrace:spec_decode_num_accepted_tokens_per_pos",
                                     "Draft tokens accepted, by position in the draft (0 = first).",
                                     labels=["model_name", "replica", "position"])
        for replica, stats in sorted(self.by_replica.items()):
            for pos, value in enumerate(stats.spec_accepted_per_pos):
                family.add_metric([self.model_name, str(replica), str(pos)], value)
        yield family


class Metrics:
    """The series of one api instance, labelled with the served model name."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, max_model_len: int | None = None):
        self.model_name = model_name
        self.multiproc_dir = os.environ.get(MULTIPROC_DIR_ENV) or None
        # Our own registry (not the global one): each app, and each test, gets fresh series.
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            # Every instance writes the same engine value: a scrape shows the newest write. One series per replica.
            return Gauge(name, doc, [*labels, "replica"], multiprocess_mode="mostrecent", registry=self.registry)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...] | list[int]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        self.num_running = gauge("headrace:num_requests_running", "Requests in the engine's running batch.")
        self.num_waiting = gauge("headrace:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("headrace:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.")
        for g in (self.num_running, self.num_waiting, self.kv_cache_usage):
            g.labels(model_name, "0")  # replica 0's series exist from the start, as before any replica label
        self.prefix_cache = PrefixCacheCounters(model_name, self.registry)
        self.spec_decode = SpecDecodeCounters(model_name, self.registry)

        self.prompt_tokens = counter("headrace:prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("headrace:generation_tokens", "Generated tokens of finished requests.")
        self.num_preemptions = counter("headrace:num_preemptions", "Preemptions of finished requests.")
        success = Counter("headrace:request_success", "Finished requests, by finish reason.",
                          [*labels, "finished_reason"], registry=self.registry)
        self.request_success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}

        token_buckets = one_two_five_buckets(max_model_len or DEFAULT_MAX_TOKENS)
        self.ttft = histogram("headrace:time_to_first_token_seconds", "Time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = histogram("headrace:inter_token_latency_seconds", "Time between output tokens in seconds.",
                             ITL_BUCKETS)
        self.e2e = histogram("headrace:e2e_request_latency_seconds", "End-to-end request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram("headrace:request_queue_time_seconds",
                                    "Time a request waited in the scheduler's queue, in seconds.",
                                    REQUEST_LATENCY_BUCKETS)
        # The request's phases as the scheduler timed them (see common.messages.RequestOutput); ingest (api
        # arrival -> queued by the scheduler: api, tokenizer and two hops) is ours, with TTFT's finer buckets.
        self.ingest_time = histogram("headrace:request_ingest_time_seconds",
                                     "Time from the api's arrival to the scheduler's queue, in seconds.",
                                     TTFT_BUCKETS)
        self.prefill_time = histogram("headrace:request_prefill_time_seconds",
                                      "Time from first scheduled to the first token, in seconds.",
                                      REQUEST_LATENCY_BUCKETS)
        self.decode_time = histogram("headrace:request_decode_time_seconds",
                                     "Time from the first token to the request's finish, in seconds.",
                                     REQUEST_LATENCY_BUCKETS)
        self.inference_time = histogram("headrace:request_inference_time_seconds",
                                        "Time from first scheduled to the request's finish, in seconds.",
                                        REQUEST_LATENCY_BUCKETS)
        self.request_prompt_tokens = histogram("headrace:request_prompt_tokens", "Prompt tokens per request.",
                                               token_buckets)
        self.request_generation_tokens = histogram("headrace:request_generation_tokens", "Generated tokens per request.",
                                                   token_buckets)

    # ------------------------------------------------------------------ EngineClient hooks

    def on_stats(self, stats: EngineStats) -> None:
        replica = str(stats.data_parallel_rank)
        self.num_running.labels(self.model_name, replica).set(stats.num_running)
        self.num_waiting.labels(self.model_name, replica).set(stats.num_waiting)
        self.kv_cache_usage.labels(self.model_name, replica).set(stats.kv_cache_usage)
        self.prefix_cache.stats = stats
        self.spec_decode.stats = stats

    def observe(self, records: list[RequestRecord], http: HttpRequest) -> None:
        """One finished HTTP request (its engine requests' records): observe each, count usage, log a line."""
        for record in records:
            self._observe(record, http.score_only)
        prompt, generated = usage_tokens(records, http.n)
        generated = 0 if http.score_only else generated
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(generated)
        if request_log.isEnabledFor(logging.INFO):
            request_log.info("%s", request_line(records, http, self.model_name, prompt, generated))

    def _observe(self, record: RequestRecord, score_only: bool = False) -> None:
        reason = record.finish_reason if record.finish_reason in FINISH_REASONS else "error"
        self.request_success[reason].inc()
        if record.e2e_latency is not None:
            self.e2e.observe(record.e2e_latency)
        if record.time_to_first_token is not None:
            self.ttft.observe(record.time_to_first_token)
        for gap in record.inter_token_latencies:
            self.itl.observe(gap)
        timings = record.timings
        for value, histogram in ((timings.ingest, self.ingest_time), (timings.queue, self.queue_time),
                                 (timings.prefill, self.prefill_time), (timings.decode, self.decode_time),
                                 (timings.inference, self.inference_time)):
            if value is not None:
                histogram.observe(value)
        if record.num_preemptions:
            self.num_preemptions.inc(record.num_preemptions)
        self.request_prompt_tokens.observe(record.num_prompt_tokens)
        self.request_generation_tokens.observe(0 if score_only else record.num_output_tokens)

    # ------------------------------------------------------------------ GET /metrics

    def render(self) -> bytes:
        if self.multiproc_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiproc_dir)  # every api process's files, merged
        merged.register(self.prefix_cache)
        merged.register(self.spec_decode)
        return generate_latest(merged)


def request_line(records: list[RequestRecord], http: HttpRequest, model: str, prompt_tokens: int,
                 generation_tokens: int) -> str:
    """`key=value` pairs describing one finished HTTP request (values with spaces or quotes are JSON strings)."""
    ttfts = [r.time_to_first_token for r in records if r.time_to_first_token is not None]
    e2es = [r.e2e_latency for r in records if r.e2e_latency is not None]
    queues = [r.timings.queue for r in records if r.timings.queue is not None]
    fields = {
        "request_id": http.request_id,
        "engine_request_ids": ",".join(r.req_id for r in records),
        "model": model,
        "prompt_tokens": prompt_tokens,
        "generation_tokens": generation_tokens,
        "ttft_s": min(ttfts) if ttfts else None,
        "e2e_s": max(e2es) if e2es else None,
        "queue_s": max(queues) if queues else None,
        "finish_reason": ",".join(r.finish_reason or "error" for r in records),
    }
    return "finished " + " ".join(f"{key}={_value(value)}" for key, value in fields.items())


def _value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    text = str(value)
    return json.dumps(text) if not text or any(c in text for c in ' "=\\') else text
