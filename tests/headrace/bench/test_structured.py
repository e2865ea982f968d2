"""`headrace bench structured` against the real server (the embedded model), at a size CI can afford."""

from __future__ import annotations

import json

import pytest

from headrace.bench import structured
from headrace.bench.structured import burst_schema, tpot_ms


def test_tpot_is_the_mean_gap_overall_or_inside_the_window():
    times = [0.0, 0.010, 0.020, 0.050, 0.080, 0.090]
    assert tpot_ms(times) == pytest.approx(18.0)
    assert tpot_ms(times, window=(0.015, 0.085)) == pytest.approx((10 + 30 + 30) / 3)  # gaps ending inside
    assert tpot_ms(times, window=(0.1, 0.2)) is None
    assert tpot_ms([0.0]) is None


def test_burst_schemas_are_distinct_texts():
    texts = {json.dumps(burst_schema(i)) for i in range(200)}
    assert len(texts) == 200


def test_a_small_run_reports_every_measurement(constrained_server, tmp_path, capsys):
    out = tmp_path / "structured.json"
    assert structured.main(["--base-url", constrained_server.base_url, "--concurrency", "2", "--max-tokens", "48",
                            "--seconds", "3", "--warmup", "1",
                            "--num-schemas", "3", "--num-streams", "2", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    for key in ("unconstrained_tok_s", "one_schema_tok_s", "tpot_ms_median_alone", "tpot_ms_median_during_burst",
                "tpot_ms_median_during_unconstrained_burst", "ttft_ms_median_unconstrained",
                "ttft_ms_median_new_schema", "ttft_ms_median_unconstrained_burst"):
        assert result[key] > 0, key
    # Constrained requests end when their JSON does: the window keeps 2 in flight all the same.
    assert 0 < result["one_schema_tokens_per_request"] <= 48 and result["unconstrained_tokens_per_request"] == 48
    assert result["throughput_ratio"] == pytest.approx(result["one_schema_tok_s"] / result["unconstrained_tok_s"])
    assert result["tpot_rise_vs_unconstrained_burst"] == pytest.approx(
        result["tpot_ms_median_during_burst"] / result["tpot_ms_median_during_unconstrained_burst"] - 1)
