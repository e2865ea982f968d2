"""`headrace bench structured`: what constrained decoding costs a running server (issue 15's GPU acceptance).

    headrace serve --model random:llama-3-8b --max-num-seqs 256 &
    headrace bench structured --base-url http://127.0.0.1:8000 --tokenizer-dir <the served tokenizer folder>

Three measurements, printed and written as JSON (--output):
1. throughput: 64 requests in flight all under one JSON schema against 64 unconstrained (same prompt,
   `ignore_eos`, the same max_tokens): output tok/s and their ratio (the target is >= 0.90). Each request that
   ends is replaced at once and the tokens are counted over a fixed window after a warm-up: a constrained
   request ends when its JSON does, often long before max_tokens, so one wave of 64 would measure a batch
   that shrinks to its stragglers, not the cost of the grammar.
2. schema burst: unconstrained streams run while 200 requests with 200 distinct new schemas arrive; the
   streams' median TPOT with and without the burst (the target is a rise < 10%), and the median time to
   first token of a new-schema request next to an unconstrained one's. The same burst is also sent without
   schemas: 200 arrivals grow the batch and bring 200 prefills whatever they ask for, so the TPOT during that
   control burst is what the grammars' own cost (compiling, masks) is measured against. A burst's TPOT is
   taken over the token gaps inside its window (first request sent to last one answered), not whole streams.
3. compile time: each of the 200 schemas compiled against the vocabulary the way a worker compiles it
   (services/gpu_worker/grammar.py), in this process: the median.

Random weights write arbitrary tokens: every schema here is bounded or cut by max_tokens, so every
constrained request ends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

from headrace.common.messages import GrammarSpec

PROMPT = "Describe an item of an inventory as JSON."
THROUGHPUT_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
    "price": {"type": "number"}, "stock": {"type": "integer"}}, "required": ["name", "tags", "price", "stock"]}


def burst_schema(i: int) -> dict:
    """Schema i of the burst: distinct text, so no cache (tokenizer or worker) has seen it."""
    return {"type": "object", "properties": {f"field_{i}_{k}": {"type": ["string", "integer", "boolean"]}
                                             for k in range(4 + i % 5)},
            "required": [f"field_{i}_0"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headrace bench structured", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="the served model name (default: the server's first)")
    p.add_argument("--tokenizer-dir", default=None, help="for the compile-time phase (skipped without it)")
    p.add_argument("--vocab-size", type=int, default=None, help="the model's logits width (default: tokenizer's)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seconds", type=float, default=20.0, help="the throughput phases' counting window")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before each throughput window opens")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--num-schemas", type=int, default=200)
    p.add_argument("--num-streams", type=int, default=32, help="unconstrained streams during the burst")
    p.add_argument("--output", default=None, help="write the results here as JSON")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    results = asyncio.run(_run(args))
    if args.tokenizer_dir:
        results["compile_ms_median"] = compile_median_ms(args.tokenizer_dir, args.vocab_size, args.num_schemas)
    print(json.dumps(results, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return 0


async def _run(args: argparse.Namespace) -> dict:
    async with httpx.AsyncClient(base_url=args.base_url, timeout=None,
                                 limits=httpx.Limits(max_connections=1024)) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        bench = _Bench(client, model, args.max_tokens)
        plain = await bench.throughput(args.concurrency, None, args.seconds, args.warmup)
        constrained = await bench.throughput(args.concurrency, THROUGHPUT_SCHEMA, args.seconds, args.warmup)
        alone = await bench.streams(args.num_streams, [])
        control = await bench.streams(args.num_streams, [None] * args.num_schemas)
        burst = await bench.streams(args.num_streams, [burst_schema(i) for i in range(args.num_schemas)])
    return {
        "unconstrained_tok_s": plain["tok_s"], "one_schema_tok_s": constrained["tok_s"],
        "throughput_ratio": constrained["tok_s"] / plain["tok_s"],
        "unconstrained_tokens_per_request": plain["tokens_per_request"],
        "one_schema_tokens_per_request": constrained["tokens_per_request"],
        "tpot_ms_median_alone": alone["tpot_ms"], "tpot_ms_median_during_burst": burst["tpot_ms"],
        "tpot_ms_median_during_unconstrained_burst": control["tpot_ms"],
        "tpot_rise": burst["tpot_ms"] / alone["tpot_ms"] - 1.0,
        "tpot_rise_vs_unconstrained_burst": burst["tpot_ms"] / control["tpot_ms"] - 1.0,
        "ttft_ms_median_unconstrained": alone["ttft_ms"], "ttft_ms_median_new_schema": burst["burst_ttft_ms"],
        "ttft_ms_median_unconstrained_burst": control["burst_ttft_ms"],
    }


class _Bench:
    def __init__(self, client: httpx.AsyncClient, model: str, max_tokens: int):
        self.client, self.model, self.max_tokens = client, model, max_tokens

    def _body(self, schema: dict | None, max_tokens: int) -> dict:
        body = {"model": self.model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        if schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        return body

    async def _stream(self, body: dict, started: list[int] | None = None, sink: list[float] | None = None
                      ) -> tuple[float, list[float]]:
        """(seconds to the first token, the arrival time of every token chunk; each also appended to `sink`
        as it comes, when given: a stream cancelled midway leaves its tokens there); `started[0]` counts
        streams past their first token."""
        t0 = time.perf_counter()
        times: list[float] = []
        async with self.client.stream("POST", "/v1/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:])["choices"]:
                    times.append(time.perf_counter())
                    if sink is not None:
                        sink.append(times[-1])
                    if len(times) == 1 and started is not None:
                        started[0] += 1
        return (times[0] - t0) if times else float("nan"), times

    async def throughput(self, n: int, schema: dict | None, seconds: float, warmup: float) -> dict:
        """Output tok/s with `n` requests always in flight, over the tokens that arrive in the `seconds` after
        `warmup`; and the mean tokens of the requests that ended."""
        arrivals: list[float] = []
        ended: list[int] = []
        opens = time.perf_counter() + warmup
        closes = opens + seconds

        async def client() -> None:
            while time.perf_counter() < closes:
                _, times = await self._stream(self._body(schema, self.max_tokens), sink=arrivals)
                ended.append(len(times))

        clients = [asyncio.ensure_future(client()) for _ in range(n)]
        await asyncio.sleep(max(0.0, closes - time.perf_counter()))
        for c in clients:  # the requests still running are dropped (the server aborts them)
            c.cancel()
        for outcome in await asyncio.gather(*clients, return_exceptions=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                raise outcome
        tokens = sum(opens <= t <= closes for t in arrivals)
        return {"tok_s": tokens / seconds, "tokens_per_request": statistics.fmean(ended) if ended else None}

    async def streams(self, n: int, burst: list[dict | None]) -> dict:
        """Unconstrained streams' TPOT and TTFT while `burst` arrives: one short request each, under that
        schema (None: unconstrained). With a burst, TPOT is over the gaps inside its window."""
        started = [0]
        streams = [asyncio.ensure_future(self._stream(self._body(None, self.max_tokens), started))
                   for _ in range(n)]
        while started[0] < n:  # every stream is decoding before the burst arrives
            finished = [s for s in streams if s.done()]
            for done in finished:
                done.result()  # a stream that failed before its first token: its error, not a wait forever
            if len(finished) == n:
                break
            await asyncio.sleep(0.005)
        start = time.perf_counter()
        news = await asyncio.gather(*(self._stream(self._body(s, 16)) for s in burst))
        window = (start, time.perf_counter()) if burst else None
        runs = await asyncio.gather(*streams)
        tpots = [tpot for _, t in runs if (tpot := tpot_ms(t, window)) is not None]
        if not tpots:
            raise SystemExit("every unconstrained stream ended before the burst did: raise --max-tokens")
        return {"tpot_ms": statistics.median(tpots), "ttft_ms": statistics.median(f * 1e3 for f, _ in runs),
                "burst_ttft_ms": statistics.median(f * 1e3 for f, _ in news) if news else None}


def tpot_ms(times: list[float], window: tuple[float, float] | None = None) -> float | None:
    """A stream's mean gap between tokens in ms: over the whole stream, or over the gaps that end inside
    `window` (None when no gap does)."""
    gaps = [b - a for a, b in zip(times, times[1:]) if window is None or window[0] <= b <= window[1]]
    return statistics.fmean(gaps) * 1e3 if gaps else None


def compile_median_ms(tokenizer_dir: str, vocab_size: int | None, count: int) -> float:
    """Each burst schema converted (as a tokenizer does) and compiled (as a worker does), one at a time."""
    from transformers import AutoTokenizer

    from headrace.services.gpu_worker.grammar import GrammarRuntime
    from headrace.services.tokenizer.grammar import to_ebnf

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    runtime = GrammarRuntime(tokenizer_dir, vocab_size or len(tokenizer), (tokenizer.eos_token_id,))
    runtime.prepare()
    times = []
    for i in range(count):
        ebnf = to_ebnf(GrammarSpec("json_schema", json.dumps(burst_schema(10_000 + i))))
        t0 = time.perf_counter()
        runtime.start(ebnf).result()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
