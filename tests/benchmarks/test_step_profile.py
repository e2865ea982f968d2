"""benchmarks/step_profile.py: one tiny CPU run of the whole script (its JSON fields, that every profiled
request is aborted or finished so the engine ends idle, the host profile's table); nothing about speed."""

from __future__ import annotations

import json

from benchmarks import step_profile


def test_tiny_run_reports_every_section(tmp_path, capsys):
    out = tmp_path / "profile.json"
    rc = step_profile.main(["--model", "random:tiny-llama", "--max-model-len", "256", "--batch-size", "1", "3",
                            "--steps", "3", "--input-len", "8", "--prefill-prompts", "2", "--prefill-len", "40",
                            "--host-profile", "16", "--top", "4", "--output-json", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    decode, prefill = results[:2], results[2]
    assert [r["batch_size"] for r in decode] == [1, 3]
    assert all(r["steps"] == 3 and r["wall_ms_per_step"] > 0 for r in decode)
    assert prefill["prompts"] == 2 and prefill["input_len"] == 40 and prefill["steps"] >= 1
    assert prefill["tokens_per_s"] > 0
    printed = capsys.readouterr().out
    assert "function calls" in printed and "batch 3:" in printed and "prefill 2 x 40" in printed
