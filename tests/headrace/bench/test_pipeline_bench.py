"""headrace/bench/pipeline_bench.py: the corpus and report helpers, and one tiny run of the whole script over real
tokenizer and api processes (its JSON fields and counts; nothing about speed)."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from headrace.bench import pipeline_bench as bench


def test_corpus_is_seeded_mixed_and_in_range():
    corpus = bench.make_corpus(40, seed=1)
    assert corpus == bench.make_corpus(40, seed=1)
    assert corpus != bench.make_corpus(40, seed=2)
    assert all(bench.MIN_CHARS <= len(p.text) <= bench.MAX_CHARS for p in corpus)
    assert [p.chat for p in corpus] == [k % bench.CHAT_EVERY == 0 for k in range(40)]
    assert len({len(p.text) for p in corpus}) > 10


def test_generate_request_forms():
    chat, plain = bench.make_corpus(2)
    req = bench.generate_request("a", chat, 8, 0)
    assert req.prompt is None and req.messages[-1] == {"role": "user", "content": chat.text}
    assert req.sampling_params.max_tokens == 8 and req.sampling_params.stop == ("###",)
    req = bench.generate_request("b", plain, 8, 1)
    assert req.prompt == plain.text and req.messages is None and req.sampling_params.stop == ()


def test_speedups_are_over_the_fewest_tokenizers():
    runs = [{"tokenizers": n, "encode_requests_per_s": rate, "detok_deltas_per_s": 2 * rate}
            for n, rate in ((2, 150.0), (1, 100.0), (4, 180.0))]
    bench.add_speedups(runs)
    assert [(r["encode_speedup"], r["detok_speedup"]) for r in runs] == [(1.5, 1.5), (1.0, 1.0), (1.8, 1.8)]


def test_scaling_note_names_the_cores_and_oversubscription():
    assert "2 usable CPU core(s)" in bench.scaling_note([1, 2, 4], 2)
    assert "The 4-process run(s) oversubscribe" in bench.scaling_note([1, 2, 4], 2)
    assert "oversubscribe" not in bench.scaling_note([1, 2], 8)


@pytest.mark.slow
def test_tiny_run_reports_every_field_and_stops_its_processes(tmp_path, capsys):
    out = tmp_path / "out.json"
    result = bench.main(["--tokenizers", "1", "2", "--requests", "6", "--detok-steps", "3", "--detok-batch", "4",
                         "--rounds", "2", "--api-requests", "3", "--concurrency", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert multiprocessing.active_children() == []

    tok = result["tokenization"]
    assert [r["tokenizers"] for r in tok["runs"]] == [1, 2]
    for r in tok["runs"]:
        assert r["requests"] == 6 and r["detok_deltas"] == 6 * 3
        assert len(r["encode_requests_per_s_rounds"]) == len(r["detok_deltas_per_s_rounds"]) == 2
        assert r["encode_requests_per_s"] == max(r["encode_requests_per_s_rounds"])
        # The same corpus tokenizes to the same tokens whichever processes did it.
        assert r["prompt_tokens"] == tok["prompt_tokens"] > 6
        for key in ("encode_requests_per_s", "encode_prompt_tokens_per_s", "detok_deltas_per_s"):
            assert r[key] > 0
    assert tok["runs"][0]["encode_speedup"] == tok["runs"][0]["detok_speedup"] == 1.0
    assert "cannot scale past" in tok["note"]

    rows = result["api_overhead"]["runs"]
    assert [(r["request"], r["concurrency"]) for r in rows] == [
        (label, c) for label, _ in bench.API_CASES for c in (1, 2)]
    for r in rows:
        assert r["requests"] == 3 and r["requests_per_s"] > 0 and r["client_cpu"] > 0
        assert 0 < r["median_ms"] <= r["p99_ms"]

    printed = capsys.readouterr().out
    assert "Tokenizer processes" in printed and "API overhead per request" in printed
