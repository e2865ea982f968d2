"""What the reliability tests share: a streaming client that records how each stream ended and when, the
server's engine gauges, and waiting for /health."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

MODEL = "SmolLM2-135M-Instruct"


@dataclass
class Stream:
    """How one streamed completion ended."""

    prompt: str
    status: int | None = None
    text: str = ""
    finish_reason: str | None = None
    error: dict | None = None  # the SSE error event's `error`, or the JSON body of a non-200
    broken: str | None = None  # the connection failed (its api process died)
    done: bool = False  # `data: [DONE]` arrived
    first_token_at: float | None = None
    ended_at: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.error is None and self.finish_reason is not None


def completion_body(prompt: str, max_tokens: int, **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


async def stream(client: httpx.AsyncClient, base_url: str, prompt: str, max_tokens: int, *,
                 leave_after: int | None = None, started: list[Stream] | None = None, **extra) -> Stream:
    """POST a streamed completion and read it to its end (or leave after `leave_after` chunks); `started`
    gets the stream once its first token has arrived."""
    out = Stream(prompt)
    try:
        async with client.stream("POST", base_url + "/v1/completions",
                                 json=completion_body(prompt, max_tokens, stream=True, **extra)) as r:
            out.status = r.status_code
            if r.status_code != 200:
                out.error = json.loads(await r.aread()).get("error")
                return out
            chunks = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out.done = True
                    break
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    out.error = event["error"]
                    continue
                choice = event["choices"][0]
                if out.first_token_at is None:
                    out.first_token_at = time.monotonic()
                    if started is not None:
                        started.append(out)
                out.text += choice["text"]
                out.finish_reason = choice.get("finish_reason") or out.finish_reason
                chunks += 1
                if leave_after is not None and chunks >= leave_after:
                    break
    except httpx.HTTPError as e:
        out.broken = f"{type(e).__name__}: {e}"
    finally:
        out.ended_at = time.monotonic()
    return out


def complete(base_url: str, prompt: str, max_tokens: int, **extra) -> httpx.Response:
    return httpx.post(base_url + "/v1/completions", json=completion_body(prompt, max_tokens, **extra), timeout=120)


def gauges(base_url: str) -> dict[str, float]:
    """running, waiting and KV usage as /metrics reports them (the scheduler's snapshot every 0.5 s)."""
    names = {"headrace:num_requests_running": "running", "headrace:num_requests_waiting": "waiting",
             "headrace:kv_cache_usage_perc": "kv"}
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return {names[line.split("{")[0]]: float(line.split()[-1]) for line in text.splitlines()
            if line.split("{")[0] in names}


def wait_idle(base_url: str, timeout_s: float = 20.0) -> float:
    """Seconds until running, waiting and KV usage are all 0 (asserts they get there)."""
    start = time.monotonic()
    seen: dict[str, float] = {}
    while time.monotonic() - start < timeout_s:
        try:
            seen = gauges(base_url)
        except httpx.HTTPError:
            seen = {}
        if seen and all(v == 0.0 for v in seen.values()):
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"the engine did not return to idle within {timeout_s}s: {seen}")


def health(base_url: str) -> int:
    try:
        return httpx.get(base_url + "/health", timeout=2).status_code
    except httpx.HTTPError:
        return 0


def wait_healthy(base_url: str, timeout_s: float = 120.0) -> float:
    start = time.monotonic()
    while health(base_url) != 200:
        assert time.monotonic() - start < timeout_s, f"/health not 200 within {timeout_s}s"
        time.sleep(0.1)
    return time.monotonic() - start


@dataclass
class HealthLog:
    """/health polled every 50 ms from a background task: when it first went 503, and when 200 again."""

    since: float
    first_down: float | None = None
    back_up: float | None = None
    codes: list[int] = field(default_factory=list)

    async def watch(self, base_url: str, until_s: float) -> None:
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() - self.since < until_s:
                try:
                    code = (await client.get(base_url + "/health")).status_code
                except httpx.HTTPError:
                    code = 0
                now = time.monotonic()
                self.codes.append(code)
                if code != 200 and self.first_down is None:
                    self.first_down = now - self.since
                if code == 200 and self.first_down is not None:
                    self.back_up = now - self.since
                    return
                await asyncio.sleep(0.05)
