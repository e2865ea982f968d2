"""Per-request timings in, benchmark numbers out: throughputs, latency summaries, goodput, peak concurrency.

Times are seconds in RequestResult and milliseconds in every summary, as `vllm bench serve` reports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    """One request as the client saw it."""

    prompt_len: int
    success: bool = False
    output_tokens: int | None = None  # from the usage chunk; None until counted
    ttft: float = 0.0  # send -> first token chunk
    itl: list[float] = field(default_factory=list)  # every gap between token chunks
    latency: float = 0.0  # send -> last token chunk (E2E)
    start_time: float = 0.0  # send time, seconds after the benchmark started
    end_time: float = 0.0  # when the client was done with it (success or not)
    generated_text: str = ""
    error: str = ""

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first; 0 for one-token outputs (as goodput counts it)."""
        n = self.output_tokens or 0
        return (self.latency - self.ttft) / (n - 1) if n > 1 else 0.0


@dataclass(frozen=True)
class Summary:
    mean: float
    median: float
    std: float
    percentiles: dict[float, float]  # percentile -> value


def summarize(values: list[float], percentiles: list[float], scale: float = 1000.0) -> Summary:
    """Mean/median/std/percentiles of `values` times `scale` (seconds -> ms); zeros when empty."""
    arr = np.asarray(values if values else [0.0], dtype=np.float64) * scale
    return Summary(float(arr.mean()), float(np.median(arr)), float(arr.std()),
                   {p: float(np.percentile(arr, p)) for p in percentiles})


def percentile_label(p: float) -> str:
    """99 -> "99", 99.9 -> "99.9" (the p{label}_{metric}_ms JSON key)."""
    return str(int(p)) if float(p).is_integer() else str(p)


def parse_goodput(pairs: list[str] | None) -> dict[str, float]:
    """["ttft:200", "tpot:50"] -> {"ttft": 200.0, "tpot": 50.0} (milliseconds), validated."""
    slos: dict[str, float] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if not sep or name not in GOODPUT_METRICS or ms < 0:
            raise ValueError(f"bad --goodput {pair!r}: expected KEY:MS with KEY in {', '.join(GOODPUT_METRICS)} "
                             "and MS >= 0")
        slos[name] = ms
    return slos


def peak_concurrency(intervals: list[tuple[float, float]]) -> int:
    """Most requests in flight at once over half-open [start, end) intervals."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])  # ends sort first on ties
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


@dataclass(frozen=True)
class BenchmarkMetrics:
    completed: int
    failed: int
    total_input: int
    total_output: int
    duration: float
    request_throughput: float
    request_goodput: float | None  # None when no --goodput SLO was given
    output_throughput: float
    total_token_throughput: float
    max_concurrent_requests: int
    latencies: dict[str, Summary]  # "ttft" | "tpot" | "itl" | "e2el" -> summary in ms


def compute_metrics(results: list[RequestResult], duration: float, percentiles: list[float],
                    goodput_slos: dict[str, float] | None = None) -> BenchmarkMetrics:
    """Aggregate finished requests. Successful ones must already carry `output_tokens`."""
    ok = [r for r in results if r.success]
    if any(r.output_tokens is None for r in ok):
        raise ValueError("count output tokens (usage or tokenizer) before computing metrics")
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_tokens or 0 for r in ok)
    duration = max(duration, 1e-9)
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [r.tpot for r in ok if (r.output_tokens or 0) > 1],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    goodput = None
    if goodput_slos:
        good = sum(all(getattr(r, _FIELD[m]) * 1000.0 <= slo for m, slo in goodput_slos.items()) for r in ok)
        goodput = good / duration
    return BenchmarkMetrics(
        completed=len(ok),
        failed=len(results) - len(ok),
        total_input=total_input,
        total_output=total_output,
        duration=duration,
        request_throughput=len(ok) / duration,
        request_goodput=goodput,
        output_throughput=total_output / duration,
        total_token_throughput=(total_input + total_output) / duration,
        max_concurrent_requests=peak_concurrency([(r.start_time, r.end_time) for r in results]),
        latencies={m: summarize(v, percentiles) for m, v in series.items()},
    )


_FIELD = {"ttft": "ttft", "tpot": "tpot", "e2el": "latency"}
