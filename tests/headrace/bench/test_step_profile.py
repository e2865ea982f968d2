"""headrace/bench/step_profile.py: one tiny CPU run of the whole script (its JSON fields, that every profiled
request is aborted or finished so the engine ends idle, the host profile's table, the mixed steps'
composition); nothing about speed."""

from __future__ import annotations

import json

from headrace.bench import step_profile


def test_tiny_run_reports_every_section(tmp_path, capsys):
    out = tmp_path / "profile.json"
    rc = step_profile.main(["--model", "random:tiny-llama", "--max-model-len", "256", "--batch-size", "1", "3",
                            "--steps", "3", "--input-len", "8", "--prefill-prompts", "2", "--prefill-len", "40",
                            "--mixed-decodes", "6", "--mixed-steps", "4", "--max-num-batched-tokens", "64",
                            "--max-num-seqs", "8", "--host-profile", "16", "--top", "4", "--output-json", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    decode, prefill, mixed = results[:2], results[2], results[3]
    assert [r["batch_size"] for r in decode] == [1, 3]
    assert all(r["steps"] == 3 and r["wall_ms_per_step"] > 0 for r in decode)
    assert prefill["prompts"] == 2 and prefill["input_len"] == 40 and prefill["steps"] >= 1
    assert prefill["tokens_per_s"] > 0 and prefill["steps"] == 2  # 80 prompt tokens in 64-token steps
    assert prefill["wall_ms_per_step"] > 0
    # every profiled mixed step: the 6 decodes and 58 prefill tokens (the rest of the 64-token budget),
    # though 6 decodes + 2 x 3 chunks-or-finished prompts exceed --max-num-seqs 8 (raised for the profile)
    assert mixed["mixed_decodes"] == 6 and mixed["prefill_len"] == 40 and mixed["steps"] == 4
    assert mixed["mean_decode_requests"] == 6 and mixed["mean_prefill_tokens"] == mixed["min_prefill_tokens"] == 58
    assert 2 <= mixed["mean_prefill_requests"] <= 3 and mixed["wall_ms_per_step"] > 0 and mixed["tokens_per_s"] > 0
    assert len(mixed["top_kernels_ms_per_step"]) <= 4
    printed = capsys.readouterr().out
    assert "function calls" in printed and "batch 3:" in printed and "prefill 2 x 40" in printed
    assert "mixed 6 decodes + 40-token prompts: 4 steps" in printed
    assert "6.0 decodes + 58.0 prefill tokens" in printed
