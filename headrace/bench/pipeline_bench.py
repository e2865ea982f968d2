"""The pipeline's CPU costs around the model: tokenizer throughput at 1, 2 and 4 processes, and the api's own
overhead per request (CPU only, loopback only).

    python -m headrace.bench.pipeline_bench [--tokenizers 1 2 4] [--requests 2000] [--json out.json]

Tokenizers: N real tokenizer processes with the embedded model's tokenizer; this process plays the api (a
ROUTER at api_inbox[0]) and the scheduler (a ROUTER at the scheduler address), as a real deployment binds
them. Encode: a fixed corpus of GenerateRequests (prose of 50-2000 characters, every fourth one as chat
messages) pushed round-robin over the tokenizers all at once, counted as TokenizedRequests reach the
scheduler ROUTER. Decode: those requests then get one new token per step (tokens of their own prompt, so the
text is real), --detok-batch of them at a time (the engine's running set) for --detok-steps steps, counted as
TextDeltas reach the api ROUTER. Each process count runs --rounds rounds of both; the best round counts.

API overhead: the real api process, with a fake tokenizer that answers every GenerateRequest at once with one
final delta and a fake scheduler that sends EngineStats (so /health is 200). httpx posts /v1/completions,
plain and streamed, one at a time and --concurrency at once: what remains is the api's own cost per request
(HTTP, validation, the zmq round trip, JSON/SSE). GET /version is the HTTP stack's floor beside it.

The harness runs on the same cores as what it measures; its own CPU use is reported with the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import zmq

from headrace.common import codec, transport
from headrace.common.addresses import AddressPlan, address_plan
from headrace.common.config import EngineConfig, ModelConfig, ServerConfig
from headrace.common.messages import (
    BatchRequestOutput,
    BatchTextDelta,
    EngineStats,
    GenerateRequest,
    Heartbeat,
    RequestOutput,
    Shutdown,
    TextDelta,
    TokenizedRequest,
)
from headrace.common.models.resolve import resolve_engine_config
from headrace.common.ports import free_port_base
from headrace.common.sampling_params import SamplingParams
from headrace.bench.metrics_summary import summarize

START_TIMEOUT_S = 300.0  # guards against hangs only: 4 tokenizers importing transformers on 2 cores is slow
PHASE_TIMEOUT_S = 600.0
MAX_MODEL_LEN = 8192  # the embedded SmolLM2's context, as the launcher would set it
CHAT_EVERY = 4  # every fourth corpus prompt goes as chat messages (rendered by the chat template)
STOP_EVERY = 3  # every third request carries a stop string, so detokenization also checks stop strings
MIN_CHARS, MAX_CHARS = 50, 2000
WARMUP_PER_TOKENIZER = 4
MODEL_NAME = "bench-model"
FAKE_TEXT = " hello"
COMPLETION_BODY = {"model": MODEL_NAME, "prompt": "Say hello to the benchmark.", "max_tokens": 16}

_WORDS = ("the of and to in is was that for on as with by he at from his an were are which this be or has had "
          "not first one their its new after who they have her she two been other when there all during into "
          "school time may years more most only over city some world would where later up such used many can "
          "state about national out known university united then made system river water between under how "
          "people because engine request model server token process memory queue cache batch latency").split()


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Prompt:
    text: str
    chat: bool


def make_corpus(count: int, seed: int = 0) -> list[Prompt]:
    """`count` prompts of English-like prose, lengths log-uniform in [MIN_CHARS, MAX_CHARS], the same for a seed."""
    rng = random.Random(seed)
    corpus = []
    for i in range(count):
        target = round(math.exp(rng.uniform(math.log(MIN_CHARS), math.log(MAX_CHARS))))
        sentences: list[str] = []
        length = 0
        while length < target:
            words = rng.choices(_WORDS, k=rng.randint(6, 20))
            if rng.random() < 0.3:
                words.insert(rng.randrange(len(words)), str(rng.randint(1, 2030)))
            if rng.random() < 0.3:
                words[rng.randrange(len(words) - 1)] += ","
            sentence = " ".join(words).capitalize() + rng.choice(".....?!")
            sentences.append(sentence)
            length += len(sentence) + 1
        corpus.append(Prompt(" ".join(sentences)[:target], chat=i % CHAT_EVERY == 0))
    return corpus


def generate_request(req_id: str, prompt: Prompt, max_tokens: int, k: int) -> GenerateRequest:
    params = SamplingParams(max_tokens=max_tokens, stop=("###",) if k % STOP_EVERY == 0 else ())
    if prompt.chat:
        messages: list[dict[str, object]] = [{"role": "system", "content": "You are a helpful assistant."},
                                             {"role": "user", "content": prompt.text}]
        return GenerateRequest(req_id, params, messages=messages, arrival_time=time.time())
    return GenerateRequest(req_id, params, prompt=prompt.text, arrival_time=time.time())


# --------------------------------------------------------------------------- child processes


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: no orphan if we are killed


def _service(module: str, config_dict: dict[str, Any], index: int) -> None:
    """A spawned child: a real service's main, logging warnings only (its own basicConfig is then a no-op)."""
    _die_with_parent()
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {module} %(levelname)s %(message)s")
    importlib.import_module(module).main(config_dict, index)


class Children:
    """The processes this benchmark starts; leaving the block stops every one (terminate, then kill)."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.procs: list[mp.Process] = []

    def start(self, target: Callable[..., None], *args: Any, name: str) -> None:
        proc = self.ctx.Process(target=target, args=args, name=name)
        proc.start()
        self.procs.append(proc)

    def check(self) -> None:
        for p in self.procs:
            if not p.is_alive():
                raise RuntimeError(f"{p.name} exited with code {p.exitcode}")

    def stop(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + 10.0
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5.0)
        self.procs.clear()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def ipc_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="hr-bench-")  # short: unix socket paths stop at 107 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- tokenizer throughput


# req_id -> (the identity of the tokenizer holding it, its prompt token ids)
Live = dict[str, tuple[bytes, list[int]]]


class Peers:
    """This process as the api (ROUTER at api_inbox[0]) and the scheduler (its ROUTER) of N tokenizers."""

    def __init__(self, plan: AddressPlan, children: Children):
        self.children = children
        self.ctx = zmq.Context()
        self.api = transport.router_socket(self.ctx, plan.api_inbox[0])
        self.scheduler = transport.router_socket(self.ctx, plan.scheduler)
        self.poller = zmq.Poller()
        self.poller.register(self.api, zmq.POLLIN)
        self.poller.register(self.scheduler, zmq.POLLIN)
        self.tokenizers: list[bytes] = []

    def close(self) -> None:
        self.ctx.destroy(linger=0)

    def receive(self, timeout_s: float) -> Iterator[tuple[zmq.Socket, bytes, Any]]:
        """(socket, sender, message) as they arrive, until the caller stops; fails on a dead child or timeout.
        Heartbeats keep arriving, so both are checked every second whatever comes in."""
        deadline = time.monotonic() + timeout_s
        next_check = 0.0
        while True:
            now = time.monotonic()
            if now >= next_check:
                self.children.check()
                if now > deadline:
                    raise TimeoutError(f"the tokenizers did not finish within {timeout_s:.0f} s")
                next_check = now + 1.0
            for sock, _ in self.poller.poll(1000):
                while (got := transport.router_recv(sock, 0)) is not None:
                    yield sock, got[0], got[1]

    def wait_for_hellos(self, n: int) -> None:
        """Every tokenizer's identity, once it said hello on both ROUTERs (so both can route to it)."""
        seen: dict[zmq.Socket, set[bytes]] = {self.api: set(), self.scheduler: set()}
        for sock, sender, msg in self.receive(START_TIMEOUT_S):
            if isinstance(msg, Heartbeat):
                seen[sock].add(sender)
            if len(seen[self.api] & seen[self.scheduler]) == n:
                break
        self.tokenizers = sorted(seen[self.api] & seen[self.scheduler])

    def encode(self, sends: list[tuple[bytes, GenerateRequest]]) -> tuple[float, float, Live]:
        """Push every request at once; (seconds, harness CPU seconds, the requests the tokenizers now hold)."""
        frames = [(identity, codec.encode(req)) for identity, req in sends]
        got: Live = {}
        t0, c0 = time.perf_counter(), time.process_time()
        for identity, data in frames:
            self.api.send_multipart([identity, data], copy=False)
        for sock, sender, msg in self.receive(PHASE_TIMEOUT_S):
            if isinstance(msg, TokenizedRequest):
                got[msg.req_id] = (sender, msg.prompt_token_ids)
                if len(got) == len(frames):
                    break
            else:
                _check_quiet(msg)
        return time.perf_counter() - t0, time.process_time() - c0, got

    def decode(self, live: Live, steps: int, batch: int) -> tuple[float, float, int]:
        """One-token outputs for every live request, all sent at once: `batch` requests at a time (the engine's
        running set, spread over the tokenizers as the scheduler spreads it) get `steps` steps, the last one
        finishing them, then the next `batch`; (seconds, harness CPU seconds, deltas received)."""
        order = list(live)
        batch = batch or len(order)
        frames = []
        for start in range(0, len(order), batch):
            by_tokenizer: dict[bytes, list[tuple[str, list[int]]]] = {}
            for req_id in order[start:start + batch]:
                identity, ids = live[req_id]
                by_tokenizer.setdefault(identity, []).append((req_id, ids))
            for step in range(steps):
                last = step == steps - 1
                for identity, reqs in by_tokenizer.items():
                    outputs = [RequestOutput(req_id, [ids[step % len(ids)]], finished=last,
                                             finish_reason="length" if last else None, num_prompt_tokens=len(ids))
                               for req_id, ids in reqs]
                    frames.append((identity, codec.encode(BatchRequestOutput(outputs, step_id=step))))
        expected, deltas = len(live) * steps, 0
        t0, c0 = time.perf_counter(), time.process_time()
        for identity, data in frames:
            self.scheduler.send_multipart([identity, data], copy=False)
        for _, _, msg in self.receive(PHASE_TIMEOUT_S):
            if isinstance(msg, BatchTextDelta):
                for delta in msg.deltas:
                    _check_quiet(delta)
                deltas += len(msg.deltas)
                if deltas >= expected:
                    break
            else:
                _check_quiet(msg)
        return time.perf_counter() - t0, time.process_time() - c0, deltas


def _check_quiet(msg: Any) -> None:
    """Only heartbeats and error-free deltas may arrive besides what a phase counts."""
    if isinstance(msg, TextDelta) and msg.error is None and msg.finish_reason != "error":
        return
    if not isinstance(msg, Heartbeat):
        raise RuntimeError(f"unexpected {type(msg).__name__} during the benchmark: {msg}")


def tokenizer_run(n: int, corpus: list[Prompt], detok_steps: int, tokenizer_dir: str, detok_batch: int = 0,
                  rounds: int = 1) -> dict[str, Any]:
    """Encode and decode throughput of `n` tokenizer processes on `corpus`: the best of `rounds` rounds (each
    encodes the whole corpus, then decodes until every request finished, so each starts from the same state).
    Best-of, because on a shared machine a slow round measures someone else's load."""
    encodes, decodes = [], []
    with ipc_dir() as folder:
        config = resolve_engine_config(EngineConfig(
            model=ModelConfig(tokenizer=tokenizer_dir, max_model_len=MAX_MODEL_LEN),
            server=ServerConfig(ipc_dir=folder, num_tokenizers=n)))
        with Children() as children:
            peers = Peers(address_plan(config.server), children)  # bound before any tokenizer connects
            try:
                for j in range(n):
                    children.start(_service, "headrace.services.tokenizer.tokenizer_service", config.to_dict(), j,
                                   name=f"tokenizer-{j}")
                peers.wait_for_hellos(n)
                toks = peers.tokenizers
                # Warm-up: each tokenizer renders a chat template and encodes once before the clock starts.
                peers.encode([(t, generate_request(f"warm-{j}-{k}", corpus[k % len(corpus)], detok_steps, k))
                              for j, t in enumerate(toks) for k in range(WARMUP_PER_TOKENIZER)])
                for r in range(rounds):
                    sends = [(toks[k % n], generate_request(f"r{r}-{k}", p, detok_steps, k))
                             for k, p in enumerate(corpus)]
                    seconds, cpu, live = peers.encode(sends)
                    tokens = sum(len(ids) for _, ids in live.values())
                    # *_harness_cpu: the cores this process (sending, receiving, counting) used meanwhile.
                    encodes.append({"encode_s": seconds, "encode_requests_per_s": len(live) / seconds,
                                    "encode_prompt_tokens_per_s": tokens / seconds,
                                    "encode_harness_cpu": cpu / seconds})
                    seconds, cpu, deltas = peers.decode(live, detok_steps, detok_batch)
                    decodes.append({"detok_deltas": deltas, "detok_s": seconds, "detok_deltas_per_s": deltas / seconds,
                                    "detok_harness_cpu": cpu / seconds})
            finally:
                peers.close()
    return {"tokenizers": n, "requests": len(live), "prompt_tokens": tokens,
            **max(encodes, key=lambda e: e["encode_requests_per_s"]),
            **max(decodes, key=lambda d: d["detok_deltas_per_s"]),
            "encode_requests_per_s_rounds": [e["encode_requests_per_s"] for e in encodes],
            "detok_deltas_per_s_rounds": [d["detok_deltas_per_s"] for d in decodes]}


def add_speedups(runs: list[dict[str, Any]]) -> None:
    """Speedup of each run over the one with the fewest tokenizers, for encode and decode."""
    base = min(runs, key=lambda r: r["tokenizers"])
    for r in runs:
        r["encode_speedup"] = r["encode_requests_per_s"] / base["encode_requests_per_s"]
        r["detok_speedup"] = r["detok_deltas_per_s"] / base["detok_deltas_per_s"]


def scaling_note(counts: list[int], cores: int) -> str:
    over = [n for n in counts if n > cores]
    note = (f"This machine has {cores} usable CPU core(s), shared with the harness process that sends and "
            f"counts the messages, so N tokenizer processes cannot scale past ~{cores}x here.")
    if over:
        note += f" The {', '.join(map(str, over))}-process run(s) oversubscribe the cores."
    return note


# --------------------------------------------------------------------------- api overhead


def _fake_engine(api_inbox: str, scheduler: str) -> None:
    """The api's peers at (nearly) no cost: a tokenizer that answers every GenerateRequest at once with one
    final delta, and a scheduler that sends EngineStats to every api that says hello."""
    _die_with_parent()
    parent = os.getppid()
    ctx = zmq.Context()
    tokenizer = transport.dealer_socket(ctx, api_inbox, prefix="faketok")
    sched = transport.router_socket(ctx, scheduler)
    poller = zmq.Poller()
    poller.register(tokenizer, zmq.POLLIN)
    poller.register(sched, zmq.POLLIN)
    apis: set[bytes] = set()
    next_beat = 0.0
    try:
        while True:
            now = time.monotonic()
            if now >= next_beat:
                if os.getppid() != parent:
                    return
                transport.dealer_send(tokenizer, Heartbeat("tokenizer", 0, time.time()))
                for api in apis:
                    transport.router_send(sched, api, EngineStats())
                next_beat = now + transport.ENGINE_STATS_INTERVAL_S
            for sock, _ in poller.poll(math.ceil(max(0.0, next_beat - time.monotonic()) * 1000)):
                if sock is sched:
                    while (got := transport.router_recv(sched, 0)) is not None:
                        apis.add(got[0])
                    continue
                while (msg := transport.dealer_recv(tokenizer, 0)) is not None:
                    if isinstance(msg, GenerateRequest):
                        transport.dealer_send(tokenizer, BatchTextDelta([TextDelta(
                            msg.req_id, text=FAKE_TEXT, token_ids=[1], finished=True, finish_reason="length",
                            num_prompt_tokens=3, num_output_tokens=1)]))
                    elif isinstance(msg, Shutdown):
                        return
    finally:
        ctx.destroy(linger=0)


def _wait_healthy(base_url: str, children: Children) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        children.check()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/health", timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{base_url}/health did not answer 200 within {START_TIMEOUT_S:.0f} s")


async def _one(client: httpx.AsyncClient, kind: str) -> None:
    """One request of `kind`; raises unless the answer is the fake engine's, whole."""
    if kind == "version":
        (await client.get("/version")).raise_for_status()
    elif kind == "completion":
        r = await client.post("/v1/completions", json=COMPLETION_BODY)
        r.raise_for_status()
        if r.json()["choices"][0]["text"] != FAKE_TEXT:
            raise RuntimeError(f"unexpected completion: {r.text}")
    else:
        async with client.stream("POST", "/v1/completions", json={**COMPLETION_BODY, "stream": True}) as r:
            r.raise_for_status()
            lines = [line async for line in r.aiter_lines() if line]
        if lines[-1] != "data: [DONE]" or not any(FAKE_TEXT in line for line in lines):
            raise RuntimeError(f"unexpected stream: {lines}")


async def _measure(base_url: str, kind: str, num_requests: int, concurrency: int) -> tuple[list[float], float, float]:
    """(latency of each request, wall seconds, client CPU seconds) for `num_requests` requests, `concurrency`
    at a time. Each of the `concurrency` users has its own client and keep-alive connection: one shared httpx
    pool of 16 connections costs the client about twice the CPU per request, which on a small machine is
    taken from the api being measured."""
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=base_url, timeout=60.0))
                   for _ in range(concurrency)]
        await asyncio.gather(*(_one(client, kind) for client in clients for _ in range(2)))  # connect, warm up
        latencies: list[float] = []
        left = num_requests

        async def user(client: httpx.AsyncClient) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                t = time.perf_counter()
                await _one(client, kind)
                latencies.append(time.perf_counter() - t)

        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(user(client) for client in clients))
        return latencies, time.perf_counter() - t0, time.process_time() - c0


API_CASES = (("GET /version (HTTP floor)", "version"), ("POST /v1/completions", "completion"),
             ("POST /v1/completions stream", "stream"))


def api_overhead(num_requests: int, concurrency: int) -> list[dict[str, Any]]:
    """Latency and requests/s of the real api process against instant fake peers."""
    port = free_port_base()
    rows = []
    with ipc_dir() as folder, Children() as children:
        config = resolve_engine_config(EngineConfig(
            model=ModelConfig(served_model_name=MODEL_NAME, max_model_len=MAX_MODEL_LEN),
            server=ServerConfig(port=port, ipc_dir=folder)))
        plan = address_plan(config.server)
        children.start(_fake_engine, plan.api_inbox[0].connect, plan.scheduler.bind, name="fake-engine")
        children.start(_service, "headrace.services.api.server", config.to_dict(), 0, name="api-0")
        base_url = f"http://127.0.0.1:{port}"
        _wait_healthy(base_url, children)
        for label, kind in API_CASES:
            for c in sorted({1, concurrency}):
                latencies, wall, cpu = asyncio.run(_measure(base_url, kind, num_requests, c))
                s = summarize(latencies, [99])
                rows.append({"request": label, "concurrency": c, "requests": len(latencies),
                             "requests_per_s": len(latencies) / wall, "mean_ms": s.mean, "median_ms": s.median,
                             "p99_ms": s.percentiles[99], "client_cpu": cpu / wall})
    return rows


# --------------------------------------------------------------------------- report


def format_report(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"{m['cpu_cores']} CPU core(s); 1-min load average {m['load_before'][0]:.2f} before, "
             f"{m['load_after'][0]:.2f} after", ""]
    tok = result.get("tokenization")
    if tok:
        lines += [f"Tokenizer processes ({tok['tokenizer']}; {tok['requests']} requests, {tok['prompt_tokens']} prompt "
                  f"tokens; decode: {tok['detok_steps']} one-token steps per request, "
                  f"{tok['detok_batch'] or 'all'} requests per step; best of {tok['rounds']} rounds)",
                  f"{'procs':>5} {'encode req/s':>13} {'prompt tok/s':>13} {'speedup':>8} {'harness':>8}"
                  f" {'detok deltas/s':>15} {'speedup':>8} {'harness':>8}"]
        for r in tok["runs"]:
            lines.append(f"{r['tokenizers']:>5} {r['encode_requests_per_s']:>13,.0f} "
                         f"{r['encode_prompt_tokens_per_s']:>13,.0f} {r['encode_speedup']:>7.2f}x "
                         f"{r['encode_harness_cpu']:>7.2f}c {r['detok_deltas_per_s']:>15,.0f} "
                         f"{r['detok_speedup']:>7.2f}x {r['detok_harness_cpu']:>7.2f}c")
        lines += ["(harness: CPU cores the benchmark process itself used meanwhile)", f"Note: {tok['note']}", ""]
    api = result.get("api_overhead")
    if api:
        lines += [f"API overhead per request (real api process, instant fake tokenizer/scheduler, httpx client on "
                  f"the same host; {api['requests']} requests each)",
                  f"{'request':<30} {'conc':>4} {'req/s':>9} {'mean ms':>8} {'median ms':>9} {'p99 ms':>8}"
                  f" {'client':>7}"]
        for r in api["runs"]:
            lines.append(f"{r['request']:<30} {r['concurrency']:>4} {r['requests_per_s']:>9,.0f} {r['mean_ms']:>8.2f} "
                         f"{r['median_ms']:>9.2f} {r['p99_ms']:>8.2f} {r['client_cpu']:>6.2f}c")
        lines.append("(client: CPU cores the httpx client used meanwhile, on the same cores as the api)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from headrace.common.models.source import resolve_model

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # Load from other users of the machine skews every number; it is recorded before and after.
    result: dict[str, Any] = {"machine": {"cpu_cores": cores, "platform": platform.platform(),
                                          "python": platform.python_version(), "load_before": list(os.getloadavg())}}
    counts = sorted(set(args.tokenizers))
    if counts:
        source = resolve_model("")  # the embedded model's converted cache folder (converted once if missing)
        corpus = make_corpus(args.requests, args.seed)
        runs = [tokenizer_run(n, corpus, args.detok_steps, source.tokenizer_dir, args.detok_batch, args.rounds)
                for n in counts]
        add_speedups(runs)
        result["tokenization"] = {"tokenizer": source.name, "requests": args.requests,
                                  "prompt_tokens": runs[0]["prompt_tokens"],
                                  "chat_fraction": sum(p.chat for p in corpus) / len(corpus),
                                  "prompt_chars": [MIN_CHARS, MAX_CHARS], "detok_steps": args.detok_steps,
                                  "detok_batch": args.detok_batch, "rounds": args.rounds,
                                  "runs": runs, "note": scaling_note(counts, cores)}
    if args.api_requests > 0:
        result["api_overhead"] = {"requests": args.api_requests, "concurrency": args.concurrency,
                                  "runs": api_overhead(args.api_requests, args.concurrency)}
    result["machine"]["load_after"] = list(os.getloadavg())
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizers", type=int, nargs="*", default=[1, 2, 4],
                    help="tokenizer process counts to measure (none: skip the tokenizer part)")
    ap.add_argument("--requests", type=int, default=2000, help="corpus size: requests per tokenizer run")
    ap.add_argument("--detok-steps", type=int, default=32, help="one-token outputs per request when decoding")
    ap.add_argument("--detok-batch", type=int, default=256,
                    help="requests decoded per step, over all tokenizers (the engine's --max-num-seqs); 0: all")
    ap.add_argument("--rounds", type=int, default=3, help="tokenizer rounds per process count; the best counts")
    ap.add_argument("--api-requests", type=int, default=1000,
                    help="HTTP requests per api case and concurrency (0: skip the api part)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)
    if min(args.requests, args.detok_steps, args.rounds, args.concurrency, *args.tokenizers) < 1:
        ap.error("--requests, --detok-steps, --rounds, --concurrency and --tokenizers must be positive")
    if args.detok_batch < 0:
        ap.error("--detok-batch must be >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every `with Children()` block stops what it started.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        result = run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
