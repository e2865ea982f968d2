"""Per-request timing: one small record per engine request, filled as its deltas arrive.

The engine client keeps one for every engine request and hands it to its `on_finished` hook (and all of an
HTTP request's records, with its `HttpRequest`, to `on_generation_finished`), so metrics (TTFT, inter-token
latency, e2e latency, token counts) can be computed without touching the routes.
Times are `time.monotonic()` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from headrace.common.messages import RequestTimings, TextDelta


@dataclass(frozen=True)
class HttpRequest:
    """The HTTP request behind a set of engine requests: its X-Request-Id (for the finished-request log
    line) and n, the choices per prompt (so prompt tokens count once per prompt, as usage counts them)."""

    request_id: str | None = None
    n: int = 1
    # max_tokens 0: the one token the engine generates to score the prompt is not output, so neither the
    # response's usage nor the token metrics count it.
    score_only: bool = False


@dataclass
class RequestRecord:
    req_id: str
    arrival: float
    first_token: float | None = None
    # One entry per output token (tokens that arrive in one delta share its time).
    token_times: list[float] = field(default_factory=list)
    finished: float | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    # From the engine: seconds in each phase, None where the engine reported none (never scheduled, no token,
    # or finished without the engine's word, e.g. aborted here); times preempted.
    timings: RequestTimings = field(default_factory=RequestTimings)
    num_preemptions: int = 0

    def on_delta(self, delta: TextDelta, now: float) -> None:
        new_tokens = len(delta.token_ids)
        if new_tokens:
            if self.first_token is None:
                self.first_token = now
            self.token_times.extend([now] * new_tokens)
        self.num_prompt_tokens = delta.num_prompt_tokens or self.num_prompt_tokens
        self.num_output_tokens = max(self.num_output_tokens, delta.num_output_tokens)
        self.num_cached_tokens = delta.num_cached_tokens or self.num_cached_tokens
        # The phases come on the first token's delta and the finishing one only; the latest value wins.
        if delta.timings is not None:
            self.timings.update(delta.timings)
        self.num_preemptions = max(self.num_preemptions, delta.num_preemptions)
        if delta.finished:
            self.on_finish(delta.finish_reason, now)

    def on_finish(self, reason: str | None, now: float) -> None:
        if self.finished is None:
            self.finished, self.finish_reason = now, reason

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def inter_token_latencies(self) -> list[float]:
        times = self.token_times
        return [b - a for a, b in zip(times, times[1:])]
