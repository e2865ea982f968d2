"""`headrace bench serve`: online-serving benchmark against any OpenAI-compatible server.

    headrace bench serve --base-url http://127.0.0.1:8000 --dataset-name sharegpt-like \
        --num-prompts 200 --request-rate 8 --save-result --result-dir results/

Sends exactly --num-prompts streamed requests (Poisson or gamma arrivals, optionally capped by
--max-concurrency) over one shared HTTP client, times every token chunk, and reports what
`vllm bench serve` reports, under the same flag names and JSON field names, so results compare directly.
Against a headrace server it also prints the server's own means over the run (from /metrics) and adds them
to the JSON as `server_means_ms` (see headrace/bench/server_metrics.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime

import httpx
import numpy as np

from headrace.common.process import event_loop_factory
from headrace.bench import server_metrics
from headrace.bench.datasets import BenchRequest, add_dataset_args, resolve_length_aliases, sample_requests
from headrace.bench.metrics_summary import (
    LATENCY_METRICS,
    BenchmarkMetrics,
    RequestResult,
    compute_metrics,
    parse_goodput,
    percentile_label,
)

METRIC_TITLES = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}
HTTP_TIMEOUT_S = 6 * 3600.0  # a benchmark request may legitimately wait long in a saturated server's queue


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headrace bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=None, help="server URL (overrides --host/--port), e.g. http://127.0.0.1:8000")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    p.add_argument("--model", default=None, help="model name to request (default: the first of GET /v1/models)")
    p.add_argument("--tokenizer", default=None,
                   help="local tokenizer folder for building prompts and counting tokens "
                        "(default: the embedded model's tokenizer)")
    p.add_argument("--label", default=None, help="prefix of the result file name (default: the backend)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default: $OPENAI_API_KEY)")

    d = add_dataset_args(p)
    d.add_argument("--seed", type=int, default=0)

    t = p.add_argument_group("traffic")
    t.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (inf: send all at once); arrivals are Poisson by default")
    t.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of inter-arrival gaps: 1 = Poisson, <1 burstier, >1 more uniform")
    t.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    t.add_argument("--ignore-eos", action="store_true",
                   help="ask the server to ignore EOS (always on for --dataset-name random)")
    t.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature (default 0: greedy, as vllm bench serve)")
    t.add_argument("--extra-body", type=json.loads, default=None, help="JSON merged into every request body")

    r = p.add_argument_group("results")
    r.add_argument("--percentile-metrics", default="ttft,tpot,itl",
                   help=f"metrics to report percentiles for, from {','.join(LATENCY_METRICS)}")
    r.add_argument("--metric-percentiles", default="99", help='percentiles to report, e.g. "50,90,99"')
    r.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs in ms (ttft, tpot, e2el); goodput counts requests meeting all of them")
    r.add_argument("--save-result", action="store_true", help="write the result JSON")
    r.add_argument("--result-dir", default=None)
    r.add_argument("--result-filename", default=None)
    r.add_argument("--disable-tqdm", action="store_true")
    return p


@dataclass(frozen=True)
class Plan:
    """Everything settled before the first request: where to send what, and how to report it."""

    base_url: str
    chat: bool
    pct_metrics: list[str]
    percentiles: list[float]
    goodput: dict[str, float]
    tokenizer_id: str
    tokenizer: object
    requests: list[BenchRequest]
    ignore_eos: bool


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = make_plan(args)
    except (ValueError, OSError) as e:  # bad flags, a missing tokenizer folder or dataset file
        print(f"headrace bench serve: {e}")
        return 2
    # The client's own latency is part of every TTFT it measures: run it on uvloop where installed.
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(_run(args, plan))


def make_plan(args: argparse.Namespace) -> Plan:
    resolve_length_aliases(args)
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if args.request_rate <= 0 or args.burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be > 0")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    if args.dataset_path and args.dataset_name != "jsonl":
        raise ValueError("--dataset-path is read only with --dataset-name jsonl")
    if not args.endpoint.endswith("completions"):
        raise ValueError("--endpoint must be an OpenAI completions or chat completions path")
    metrics = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    if unknown := [m for m in metrics if m not in LATENCY_METRICS]:
        raise ValueError(f"unknown --percentile-metrics {unknown}; known: {', '.join(LATENCY_METRICS)}")
    percentiles = [float(x) for x in args.metric_percentiles.split(",") if x.strip()]
    if any(not 0 <= x <= 100 for x in percentiles):
        raise ValueError("--metric-percentiles must be in [0, 100]")
    goodput = parse_goodput(args.goodput)
    tokenizer_id, tokenizer = _load_tokenizer(args.tokenizer)
    requests = sample_requests(args.dataset_name, args.num_prompts, tokenizer, args.random_input_len,
                               args.random_output_len, args.seed, args.dataset_path, args.random_range_ratio)
    return Plan(
        base_url=(args.base_url or f"http://{args.host}:{args.port}").rstrip("/"),
        chat=args.endpoint.endswith("chat/completions"),
        pct_metrics=metrics, percentiles=percentiles, goodput=goodput,
        tokenizer_id=tokenizer_id, tokenizer=tokenizer, requests=requests,
        # Random text rarely runs to the asked length before EOS; vLLM turns this on for it too.
        ignore_eos=args.ignore_eos or args.dataset_name == "random",
    )


async def _run(args: argparse.Namespace, plan: Plan) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base_url, chat, requests, tokenizer = plan.base_url, plan.chat, plan.requests, plan.tokenizer
    # One client for the whole run; enough connections that the pool never queues a request itself.
    limit = args.max_concurrency or args.num_prompts
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, limits=httpx.Limits(
            max_connections=limit, max_keepalive_connections=limit)) as client:
        model = args.model
        if model is None:
            try:
                model = await first_model(client, base_url, headers)
            except (httpx.HTTPError, ValueError, KeyError) as e:
                print(f"headrace bench serve: cannot list models at {base_url}/v1/models: {e}")
                return 1
        sampling = {"temperature": args.temperature}
        extra = {**sampling, **(args.extra_body or {})}
        print(f"Model: {model}  endpoint: {base_url}{args.endpoint}  dataset: {args.dataset_name} "
              f"({len(requests)} prompts)")
        print(f"Traffic request rate: {args.request_rate}  burstiness: {args.burstiness} "
              f"({'Poisson process' if args.burstiness == 1.0 else 'gamma distribution'})  "
              f"max concurrency: {args.max_concurrency}")
        arrivals = arrival_times(len(requests), args.request_rate, args.burstiness,
                                 np.random.default_rng([args.seed, 1]))
        # A headrace server's own histograms, before and after: its side of the latencies (None: not ours).
        before = await server_metrics.scrape(client, base_url, headers)
        results, duration = await run_requests(
            client, base_url + args.endpoint, requests, arrivals,
            lambda req: build_payload(model, req, chat, plan.ignore_eos, extra), headers, chat,
            args.max_concurrency, args.disable_tqdm)
        after = await server_metrics.scrape(client, base_url, headers) if before is not None else None

    for res in results:  # servers that send no usage chunk: count the streamed text
        if res.success and res.output_tokens is None:
            res.output_tokens = len(tokenizer.encode(res.generated_text, add_special_tokens=False))
    metrics = compute_metrics(results, duration, plan.percentiles, plan.goodput)
    backend = "openai-chat" if chat else "openai"
    print(format_table(metrics, plan.pct_metrics, args.max_concurrency, args.request_rate))
    failures = [r.error for r in results if not r.success]
    for i, err in enumerate(failures[:10]):
        print(f"Error {i}: {err}")
    server_means = None
    if before is not None and after is not None:
        server_means = server_metrics.means_ms(before, after)
        print(server_metrics.format_block(server_means, server_metrics.observed_requests(before, after),
                                          metrics.latencies["ttft"].mean if metrics.completed else None))

    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    result = {
        "date": date,
        "backend": backend,
        "label": args.label,
        "model_id": model,
        "tokenizer_id": plan.tokenizer_id,
        "num_prompts": args.num_prompts,
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        **result_fields(metrics, results, plan.pct_metrics),
    }
    if server_means is not None:  # ours, not vLLM's: the server's exact means over the run (server_metrics.py)
        result["server_means_ms"] = server_means
    if args.save_result:
        path = result_path(args, backend, model, date)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f)
        print(f"Result written to {path}")
    return 0 if metrics.completed else 1


def _load_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    if path is None:
        from headrace.common.models.source import resolve_model

        path = resolve_model("").tokenizer_dir
    return path, AutoTokenizer.from_pretrained(path)


async def first_model(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> str:
    resp = await client.get(f"{base_url}/v1/models", headers=headers)
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise ValueError("the server lists no models")
    return data[0]["id"]


def arrival_times(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """Send times (seconds from the start) of n requests: gamma-distributed gaps of mean 1/rate (shape
    `burstiness`; 1 is Poisson), rescaled so the last arrival is at n/rate exactly; this keeps the offered
    load equal across seeds, as vLLM does. rate=inf sends everything at once."""
    if math.isinf(rate):
        return [0.0] * n
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / rate)
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    times = np.cumsum(gaps)
    return (times * (n / rate) / times[-1]).tolist()


def build_payload(model: str, req: BenchRequest, chat: bool, ignore_eos: bool, extra: dict) -> dict:
    body: dict = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        # Chat needs text: serve samples text prompts (jsonl token-id prompts are decoded by the dataset).
        body["messages"] = [{"role": "user", "content": req.prompt}]
        body["max_completion_tokens"] = req.output_len
    else:
        body["prompt"] = req.prompt
        body["max_tokens"] = req.output_len
    if ignore_eos:
        body["ignore_eos"] = True
    return {**body, **extra}


async def run_requests(client: httpx.AsyncClient, url: str, requests: list[BenchRequest], arrivals: list[float],
                       payload_of, headers: dict[str, str], chat: bool, max_concurrency: int | None,
                       disable_tqdm: bool = False) -> tuple[list[RequestResult], float]:
    """Launch each request at its arrival time (waiting for a slot under max_concurrency), stream them
    all, and return (results in request order, wall time from the start to the last completion)."""
    from tqdm import tqdm

    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    pbar = tqdm(total=len(requests), disable=disable_tqdm)
    t0 = time.perf_counter()

    async def one(req: BenchRequest) -> RequestResult:
        if slots is None:
            res = await stream_request(client, url, payload_of(req), headers, chat, req.prompt_len, t0)
        else:
            async with slots:
                res = await stream_request(client, url, payload_of(req), headers, chat, req.prompt_len, t0)
        pbar.update(1)
        return res

    tasks = []
    for req, at in zip(requests, arrivals):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(req)))
    results = list(await asyncio.gather(*tasks))
    duration = time.perf_counter() - t0
    pbar.close()
    return results, duration


async def stream_request(client: httpx.AsyncClient, url: str, payload: dict, headers: dict[str, str], chat: bool,
                         prompt_len: int, t0: float) -> RequestResult:
    """One streamed request, timed per token chunk. Never raises: failures come back with `error` set."""
    res = RequestResult(prompt_len=prompt_len)
    sent = last = time.perf_counter()
    res.start_time = sent - t0
    pieces: list[str] = []
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {_error_text((await resp.aread()).decode(errors='replace'))}"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):  # blank separators, ": ping" comments, event/id fields
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    chunk = json.loads(data)
                    if "error" in chunk:
                        res.error = f"stream error: {_error_text(data)}"
                        break
                    if usage := chunk.get("usage"):
                        res.output_tokens = usage.get("completion_tokens", res.output_tokens)
                        res.prompt_len = usage.get("prompt_tokens") or res.prompt_len
                    piece = token_text(chunk, chat)
                    if piece is None:
                        continue
                    if pieces:
                        res.itl.append(now - last)
                    else:
                        res.ttft = now - sent
                    last = now
                    pieces.append(piece)
                if not res.error:
                    res.success = bool(pieces)
                    res.error = "" if pieces else "the stream ended before any token"
    except Exception as e:  # a failed request is a data point, never the end of the run
        res.error = f"{type(e).__name__}: {e}"
        res.success = False
    res.latency = last - sent
    res.end_time = time.perf_counter() - t0
    res.generated_text = "".join(pieces)
    return res


def token_text(chunk: dict, chat: bool) -> str | None:
    """The text a streamed chunk adds, or None when it carries no token: usage-only chunks, the chat role
    preamble, and a bare finish marker. (An empty string is still a token, e.g. a special token.)"""
    choices = chunk.get("choices")
    if not choices:
        return None
    choice = choices[0]
    if chat:
        delta = choice.get("delta") or {}
        text = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or ""
        preamble = "role" in delta
    else:
        text, preamble = choice.get("text") or "", False
    if not text and (preamble or choice.get("finish_reason")):
        return None
    return text


def _error_text(body: str) -> str:
    try:
        err = json.loads(body).get("error")
        message = err.get("message") if isinstance(err, dict) else err
        return str(message or body)[:500]
    except (json.JSONDecodeError, AttributeError):
        return body[:500]


def format_table(m: BenchmarkMetrics, pct_metrics: list[str], max_concurrency: int | None, rate: float) -> str:
    rows = ["{:=^50}".format(" Serving Benchmark Result ")]

    def row(label: str, value, fmt: str = "") -> None:
        rows.append(f"{label:<40} {value:<10{fmt}}")

    row("Successful requests:", m.completed)
    row("Failed requests:", m.failed)
    if max_concurrency is not None:
        row("Maximum request concurrency:", max_concurrency)
    if math.isfinite(rate):
        row("Request rate configured (RPS):", rate, ".2f")
    row("Benchmark duration (s):", m.duration, ".2f")
    row("Total input tokens:", m.total_input)
    row("Total generated tokens:", m.total_output)
    row("Request throughput (req/s):", m.request_throughput, ".2f")
    if m.request_goodput is not None:
        row("Request goodput (req/s):", m.request_goodput, ".2f")
    row("Output token throughput (tok/s):", m.output_throughput, ".2f")
    row("Total token throughput (tok/s):", m.total_token_throughput, ".2f")
    row("Peak concurrent requests:", m.max_concurrent_requests)
    for name in LATENCY_METRICS:
        short, title = METRIC_TITLES[name]
        s = m.latencies[name]
        rows.append("{:-^50}".format(title))
        row(f"Mean {short} (ms):", s.mean, ".2f")
        row(f"Median {short} (ms):", s.median, ".2f")
        if name in pct_metrics:
            for p, v in s.percentiles.items():
                row(f"P{percentile_label(p)} {short} (ms):", v, ".2f")
    rows.append("=" * 50)
    return "\n".join(rows)


def result_fields(m: BenchmarkMetrics, results: list[RequestResult], pct_metrics: list[str]) -> dict:
    """The run's JSON fields, named as `vllm bench serve` names them (per-request lists in request order)."""
    out = {
        "duration": m.duration,
        "completed": m.completed,
        "failed": m.failed,
        "total_input_tokens": m.total_input,
        "total_output_tokens": m.total_output,
        "request_throughput": m.request_throughput,
        "request_goodput": m.request_goodput,
        "output_throughput": m.output_throughput,
        "total_token_throughput": m.total_token_throughput,
        "max_concurrent_requests": m.max_concurrent_requests,
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [(r.output_tokens or 0) if r.success else 0 for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "latencies": [r.latency for r in results],
        "start_times": [r.start_time for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
    }
    for name in LATENCY_METRICS:
        s = m.latencies[name]
        out[f"mean_{name}_ms"], out[f"median_{name}_ms"], out[f"std_{name}_ms"] = s.mean, s.median, s.std
        if name in pct_metrics:
            for p, v in s.percentiles.items():
                out[f"p{percentile_label(p)}_{name}_ms"] = v
    return out


def result_path(args: argparse.Namespace, backend: str, model: str, date: str) -> str:
    concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency is not None else ""
    name = args.result_filename or (
        f"{args.label or backend}-{args.request_rate}qps{concurrency}-{model.split('/')[-1]}-{date}.json")
    if args.result_dir:
        os.makedirs(args.result_dir, exist_ok=True)
        name = os.path.join(args.result_dir, name)
    return name
