"""The server's own view of a `headrace bench serve` run: its Prometheus histograms, scraped before and after.

When the server is headrace (its /metrics has `headrace:` series), the exact mean of each phase over the run is
(sum after - sum before) / (count after - count before). Set beside the client's numbers they split the time
to first token:
  client TTFT - server TTFT              = the client's side: HTTP, SSE framing, the client's own event loop;
  server TTFT - ingest - queue - prefill = the way back: scheduler -> tokenizer (detokenize) -> api.
Other traffic the server serves during the run is counted too: run it alone for a clean split.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "headrace:"
# server_means_ms key -> histogram (seconds).
SERVER_HISTOGRAMS = {
    "ttft": "headrace:time_to_first_token_seconds",
    "ingest": "headrace:request_ingest_time_seconds",
    "queue": "headrace:request_queue_time_seconds",
    "prefill": "headrace:request_prefill_time_seconds",
    "decode": "headrace:request_decode_time_seconds",
    "e2e": "headrace:e2e_request_latency_seconds",
    "itl": "headrace:inter_token_latency_seconds",
}
TITLES = {"ttft": "TTFT", "ingest": "ingest (api -> queued)", "queue": "queue", "prefill": "prefill",
          "decode": "decode", "e2e": "E2EL", "itl": "ITL"}

# histogram name -> (sum, count), summed over label sets.
Totals = dict[str, tuple[float, float]]


def parse_totals(text: str) -> Totals | None:
    """Every `headrace:` histogram's (sum, count) in an exposition text; None if the text has no `headrace:`
    series (another server) or is not Prometheus text at all."""
    totals: dict[str, list[float]] = {}
    ours = False
    try:
        for family in text_string_to_metric_families(text):
            if not family.name.startswith(PREFIX):
                continue
            ours = True
            for s in family.samples:
                for suffix, i in (("_sum", 0), ("_count", 1)):
                    if s.name == family.name + suffix:
                        totals.setdefault(family.name, [0.0, 0.0])[i] += s.value
    except Exception:  # not exposition text (an HTML error page, a JSON 404, ...)
        return None
    return {name: (v[0], v[1]) for name, v in totals.items()} if ours else None


async def scrape(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> Totals | None:
    """GET /metrics and parse it; None when it is missing, failing or not a headrace server's."""
    try:
        resp = await client.get(f"{base_url}/metrics", headers=headers)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    return parse_totals(resp.text)


def means_ms(before: Totals, after: Totals) -> dict[str, float | None]:
    """The mean of each SERVER_HISTOGRAMS series over the window, in ms (None where nothing was observed)."""
    out: dict[str, float | None] = {}
    for key, name in SERVER_HISTOGRAMS.items():
        s0, c0 = before.get(name, (0.0, 0.0))
        s1, c1 = after.get(name, (0.0, 0.0))
        out[key] = (s1 - s0) / (c1 - c0) * 1000.0 if c1 > c0 else None
    return out


def observed_requests(before: Totals, after: Totals) -> int:
    """Requests the server finished in the window (its e2e histogram's count delta)."""
    name = SERVER_HISTOGRAMS["e2e"]
    return int(after.get(name, (0.0, 0.0))[1] - before.get(name, (0.0, 0.0))[1])


def format_block(means: dict[str, float | None], requests: int, client_ttft_ms: float | None) -> str:
    """The "server-side" block printed under the benchmark table."""
    rows = ["{:=^50}".format(" Server-side (from /metrics) ")]

    def row(label: str, value: float | int | None, fmt: str = ".2f") -> None:
        rows.append(f"{label:<40} {'n/a' if value is None else format(value, fmt):<10}")

    row("Requests observed:", requests, "d")
    for key, title in TITLES.items():
        row(f"Mean {title} (ms):", means.get(key))
    ttft = means.get("ttft")
    parts = [means.get(k) for k in ("ingest", "queue", "prefill")]
    rows.append("{:-^50}".format("TTFT split"))
    row("Client side (client - server TTFT):",
        None if ttft is None or client_ttft_ms is None else client_ttft_ms - ttft)
    row("Way back (TTFT-ingest-queue-prefill):",
        None if ttft is None or None in parts else ttft - sum(parts))
    rows.append("=" * 50)
    return "\n".join(rows)
