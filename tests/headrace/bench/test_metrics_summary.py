"""Benchmark math on synthetic timings: summaries, TPOT, goodput, peak concurrency, throughputs."""

from __future__ import annotations

import pytest

from headrace.bench.metrics_summary import (
    RequestResult,
    compute_metrics,
    parse_goodput,
    peak_concurrency,
    percentile_label,
    summarize,
)


def ok(ttft: float, itl: list[float], n: int, start: float = 0.0, prompt_len: int = 10) -> RequestResult:
    latency = ttft + sum(itl)
    return RequestResult(prompt_len=prompt_len, success=True, output_tokens=n, ttft=ttft, itl=itl, latency=latency,
                         start_time=start, end_time=start + latency)


def test_summarize_in_milliseconds_with_linear_percentiles():
    s = summarize([0.001, 0.002, 0.003, 0.004], [50, 99, 25])
    assert s.mean == pytest.approx(2.5) and s.median == pytest.approx(2.5)
    assert s.std == pytest.approx(1.118033988, rel=1e-6)  # population std, as vLLM reports
    assert s.percentiles[99] == pytest.approx(3.97) and s.percentiles[25] == pytest.approx(1.75)
    assert summarize([], [99]).mean == 0.0
    assert percentile_label(99.0) == "99" and percentile_label(99.9) == "99.9"


def test_compute_metrics_aggregates_successes_only():
    results = [
        ok(0.100, [0.010, 0.020, 0.030], 4, start=0.0),  # tpot = 0.06 / 3 = 20 ms
        ok(0.300, [0.040], 2, start=0.5, prompt_len=30),  # tpot = 40 ms
        ok(0.050, [], 1, start=1.0),  # one token: no tpot
        RequestResult(prompt_len=99, error="HTTP 500: boom", start_time=1.2, end_time=1.3),
    ]
    m = compute_metrics(results, duration=2.0, percentiles=[50, 100])
    assert (m.completed, m.failed) == (3, 1)
    assert (m.total_input, m.total_output) == (50, 7)
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(3.5)
    assert m.total_token_throughput == pytest.approx(28.5)
    assert m.request_goodput is None
    assert m.latencies["ttft"].mean == pytest.approx(150.0)
    assert m.latencies["tpot"].mean == pytest.approx(30.0)
    assert m.latencies["tpot"].percentiles[100] == pytest.approx(40.0)
    assert m.latencies["itl"].mean == pytest.approx(25.0)  # every gap of every request: 10, 20, 30, 40
    assert m.latencies["e2el"].median == pytest.approx(160.0)
    assert m.max_concurrent_requests == 1  # the intervals never overlap


def test_goodput_counts_requests_meeting_every_slo():
    results = [ok(0.100, [0.010] * 4, 5), ok(0.300, [0.010] * 4, 5), ok(0.100, [0.090] * 4, 5), ok(0.050, [], 1)]
    m = compute_metrics(results, duration=2.0, percentiles=[99], goodput_slos=parse_goodput(["ttft:200", "tpot:50"]))
    # Good: #0 (100 ms, 10 ms) and #3 (one token counts tpot as 0); #1 misses TTFT, #2 misses TPOT.
    assert m.request_goodput == pytest.approx(1.0)
    m = compute_metrics(results, duration=2.0, percentiles=[99], goodput_slos={"e2el": 150.0})
    assert m.request_goodput == pytest.approx(1.0)  # e2el 140, 340, 460, 50 ms


def test_parse_goodput_rejects_bad_pairs():
    assert parse_goodput(["ttft:200", "e2el:1.5"]) == {"ttft": 200.0, "e2el": 1.5}
    assert parse_goodput(None) == {}
    for bad in (["itl:5"], ["ttft"], ["ttft:-1"], ["tpot:fast"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_peak_concurrency_uses_half_open_intervals():
    assert peak_concurrency([]) == 0
    assert peak_concurrency([(0, 1), (1, 2), (2, 3)]) == 1  # back to back never overlap
    assert peak_concurrency([(0, 10), (1, 2), (1.5, 3), (2.5, 4)]) == 3


def test_uncounted_outputs_are_refused():
    with pytest.raises(ValueError, match="output tokens"):
        compute_metrics([RequestResult(prompt_len=1, success=True)], 1.0, [99])
