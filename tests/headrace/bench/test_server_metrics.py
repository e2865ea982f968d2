"""The server-side block of `headrace bench serve`: /metrics totals, the means over a run, skipping other servers."""

from __future__ import annotations

import re

import pytest

from headrace.bench import server_metrics

PHASES = ("ttft", "ingest", "queue", "prefill", "decode", "e2e", "itl")


def exposition(totals: dict[str, tuple[float, int]], model: str = "m", created: bool = True) -> str:
    """Prometheus text of histograms {name: (sum, count)} as prometheus_client writes them, buckets included."""
    lines = []
    for name, (total, count) in totals.items():
        lines += [f"# HELP {name} A histogram.", f"# TYPE {name} histogram"]
        lines += [f'{name}_bucket{{le="0.1",model_name="{model}"}} {count // 2}.0',
                  f'{name}_bucket{{le="+Inf",model_name="{model}"}} {count}.0',
                  f'{name}_count{{model_name="{model}"}} {count}.0',
                  f'{name}_sum{{model_name="{model}"}} {total}']
        if created:
            lines.append(f'{name}_created{{model_name="{model}"}} 1.7e+09')
    lines += ["# HELP headrace:num_requests_running Requests running.", "# TYPE headrace:num_requests_running gauge",
              'headrace:num_requests_running{model_name="m"} 3.0']
    return "\n".join(lines) + "\n"


BEFORE = {
    "headrace:time_to_first_token_seconds": (1.0, 10),
    "headrace:request_ingest_time_seconds": (0.01, 10),
    "headrace:request_queue_time_seconds": (0.5, 10),
    "headrace:request_prefill_time_seconds": (0.25, 10),
    "headrace:request_decode_time_seconds": (4.0, 10),
    "headrace:e2e_request_latency_seconds": (5.0, 10),
    "headrace:inter_token_latency_seconds": (4.0, 100),
}
AFTER = {  # 4 more requests, 40 more token gaps
    "headrace:time_to_first_token_seconds": (1.1, 14),
    "headrace:request_ingest_time_seconds": (0.014, 14),
    "headrace:request_queue_time_seconds": (0.5, 14),
    "headrace:request_prefill_time_seconds": (0.31, 14),
    "headrace:request_decode_time_seconds": (4.8, 14),
    "headrace:e2e_request_latency_seconds": (5.9, 14),
    "headrace:inter_token_latency_seconds": (4.8, 140),
}


def test_means_are_the_deltas_of_sum_over_count():
    before = server_metrics.parse_totals(exposition(BEFORE))
    after = server_metrics.parse_totals(exposition(AFTER))
    assert before["headrace:inter_token_latency_seconds"] == (4.0, 100.0)  # buckets and _created not summed
    means = server_metrics.means_ms(before, after)
    assert list(means) == list(PHASES)
    assert means == pytest.approx({"ttft": 25.0, "ingest": 1.0, "queue": 0.0, "prefill": 15.0, "decode": 200.0,
                                   "e2e": 225.0, "itl": 20.0})
    assert server_metrics.observed_requests(before, after) == 4

    block = server_metrics.format_block(means, 4, client_ttft_ms=31.5)
    assert "Server-side" in block and "Requests observed:" in block
    assert "Mean TTFT (ms):" in block and "Mean prefill (ms):" in block and "Mean ITL (ms):" in block
    lines = dict(m.groups() for line in block.splitlines() if (m := re.fullmatch(r"(.+:)\s+(\S+)\s*", line)))
    assert float(lines["Mean decode (ms):"]) == 200.0
    assert float(lines["Client side (client - server TTFT):"]) == pytest.approx(6.5)
    assert float(lines["Way back (TTFT-ingest-queue-prefill):"]) == pytest.approx(25.0 - 1.0 - 0.0 - 15.0)


def test_label_sets_add_up_and_missing_series_read_as_none():
    # Two label sets of one histogram are summed; a histogram an older server lacks has no mean.
    name = "headrace:time_to_first_token_seconds"
    text = "\n".join([f"# TYPE {name} histogram",
                      f'{name}_count{{model_name="a"}} 4.0', f'{name}_sum{{model_name="a"}} 1.0',
                      f'{name}_count{{model_name="b"}} 4.0', f'{name}_sum{{model_name="b"}} 3.0']) + "\n"
    totals = server_metrics.parse_totals(text)
    assert totals["headrace:time_to_first_token_seconds"] == (4.0, 8.0)
    means = server_metrics.means_ms({}, totals)
    assert means["ttft"] == pytest.approx(500.0)
    assert means["ingest"] is None and means["itl"] is None
    # No request in the window: no mean, rather than a division by zero.
    assert server_metrics.means_ms(totals, totals)["ttft"] is None
    block = server_metrics.format_block(server_metrics.means_ms(totals, totals), 0, client_ttft_ms=None)
    assert "n/a" in block


@pytest.mark.parametrize("text", [
    "",  # empty
    "# TYPE vllm:time_to_first_token_seconds histogram\nvllm:time_to_first_token_seconds_sum 1.0\n",  # not ours
    "<html><body>404 Not Found</body></html>",  # not exposition text
    '{"detail": "Not Found"}',
])
def test_other_servers_are_not_ours(text):
    assert server_metrics.parse_totals(text) is None
