"""Benchmark datasets: seeded, ShareGPT-like means, random prompts of the asked token length."""

from __future__ import annotations

import json

import numpy as np
import pytest

from headrace.bench.datasets import (
    SHAREGPT_INPUT_MEAN,
    SHAREGPT_MAX_LEN,
    SHAREGPT_MIN_LEN,
    SHAREGPT_OUTPUT_MEAN,
    BenchRequest,
    sample_requests,
)


def test_same_seed_same_requests_other_seed_others(embedded_tokenizer):
    for name in ("random", "sharegpt-like"):
        a = sample_requests(name, 8, embedded_tokenizer, input_len=48, output_len=16, seed=3)
        b = sample_requests(name, 8, embedded_tokenizer, input_len=48, output_len=16, seed=3)
        c = sample_requests(name, 8, embedded_tokenizer, input_len=48, output_len=16, seed=4)
        assert a == b
        assert [r.prompt for r in a] != [r.prompt for r in c]


def test_sharegpt_like_means_match_sharegpt(embedded_tokenizer):
    reqs = sample_requests("sharegpt-like", 1000, embedded_tokenizer, seed=0)
    prompt_lens = np.array([r.prompt_len for r in reqs])
    output_lens = np.array([r.output_len for r in reqs])
    assert abs(prompt_lens.mean() / SHAREGPT_INPUT_MEAN - 1) < 0.10
    assert abs(output_lens.mean() / SHAREGPT_OUTPUT_MEAN - 1) < 0.10
    assert output_lens.min() >= SHAREGPT_MIN_LEN and output_lens.max() <= SHAREGPT_MAX_LEN
    # A mix, not one length: long-tailed like real chats (median well below mean).
    assert np.median(prompt_lens) < prompt_lens.mean() and len(set(prompt_lens.tolist())) > 100
    # prompt_len is the real count of the text's tokens.
    for r in reqs[:50]:
        assert len(embedded_tokenizer.encode(r.prompt, add_special_tokens=False)) == r.prompt_len


def test_random_prompts_have_the_requested_token_length(embedded_tokenizer):
    reqs = sample_requests("random", 20, embedded_tokenizer, input_len=128, output_len=7, seed=1)
    special = set(embedded_tokenizer.added_tokens_decoder)
    for r in reqs:
        ids = embedded_tokenizer.encode(r.prompt, add_special_tokens=False)
        assert isinstance(r.prompt, str) and len(ids) == r.prompt_len
        assert abs(r.prompt_len - 128) <= 2
        assert r.output_len == 7
        assert not special & set(ids), "random text must not spell control tokens"
    assert len({r.prompt for r in reqs}) == 20


def test_random_range_ratio_bounds_lengths(embedded_tokenizer):
    reqs = sample_requests("random", 200, embedded_tokenizer, input_len=40, output_len=100, seed=0,
                           range_ratio=0.5, as_token_ids=True)
    ins, outs = [r.prompt_len for r in reqs], [r.output_len for r in reqs]
    assert 20 <= min(ins) < 30 and 50 < max(ins) <= 60
    assert 50 <= min(outs) < 60 and 140 < max(outs) <= 150
    with pytest.raises(ValueError):
        sample_requests("random", 2, embedded_tokenizer, range_ratio=1.0)


def test_token_id_prompts_are_exact_and_plain(embedded_tokenizer):
    reqs = sample_requests("random", 5, embedded_tokenizer, input_len=64, output_len=8, seed=2, as_token_ids=True)
    special = set(embedded_tokenizer.added_tokens_decoder)
    for r in reqs:
        assert isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len == 64
        assert all(isinstance(t, int) and 0 <= t < embedded_tokenizer.vocab_size for t in r.prompt)
        assert not special & set(r.prompt)


def test_jsonl_shuffles_cycles_and_defaults_output_len(tmp_path, embedded_tokenizer):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Tell me about rivers.", "output_len": 5}, {"prompt": "Hello there"},
            {"prompt": [28120, 905], "output_len": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    reqs = sample_requests("jsonl", 7, embedded_tokenizer, output_len=11, seed=0, dataset_path=str(path))
    assert len(reqs) == 7
    by_prompt = {r.prompt: r for r in reqs}
    assert by_prompt["Tell me about rivers."] == BenchRequest(
        "Tell me about rivers.", len(embedded_tokenizer.encode("Tell me about rivers.", add_special_tokens=False)), 5)
    assert by_prompt["Hello there"].output_len == 11
    decoded = embedded_tokenizer.decode([28120, 905])
    assert by_prompt[decoded].prompt_len == 2 and by_prompt[decoded].output_len == 3
    assert sorted(r.prompt for r in reqs[:3]) == sorted(by_prompt)  # every row once before any repeats
    as_ids = sample_requests("jsonl", 3, embedded_tokenizer, seed=0, dataset_path=str(path), as_token_ids=True)
    assert all(isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len for r in as_ids)


def test_bad_names_and_inputs_are_errors(tmp_path, embedded_tokenizer):
    with pytest.raises(ValueError, match="unknown dataset"):
        sample_requests("sharegpt", 1, embedded_tokenizer)
    with pytest.raises(ValueError, match="dataset-path"):
        sample_requests("jsonl", 1, embedded_tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        sample_requests("jsonl", 1, embedded_tokenizer, dataset_path=str(bad))
