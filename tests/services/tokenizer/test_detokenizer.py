"""Incremental detokenization: whole characters only, and the deltas add up to the one-shot decode."""

from __future__ import annotations

import random

import pytest

from headrace.common.sampling_params import SamplingParams
from headrace.services.tokenizer.detokenizer import IncrementalDetokenizer, TokenTexts

TEXTS = [
    "héllo 世界 🎉",
    "Ünïcödé: naïve café, 日本語のテキスト, 한국어, emoji 👩‍👩‍👧‍👦🏳️‍🌈 and math ∑∫√",
    "  leading spaces\n\ttabs and\r\nnewlines  ",
    "plain ASCII words, numbers 12345 and code: def f(x): return x**2",
]


def stream(detok: IncrementalDetokenizer, ids: list[int], step: int = 1, stop_token: bool = False) -> list[str]:
    """Feed `ids` `step` at a time (the last batch finishes the request); return the deltas."""
    chunks = [ids[i:i + step] for i in range(0, len(ids), step)]
    return [detok.update(c, finished=k == len(chunks) - 1, stop_token=stop_token and k == len(chunks) - 1).text
            for k, c in enumerate(chunks)]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 3])
def test_deltas_concatenate_to_one_shot_decode(raw_tokenizer, text, step):
    ids = raw_tokenizer.encode(text, add_special_tokens=False).ids
    deltas = stream(IncrementalDetokenizer(raw_tokenizer, SamplingParams()), ids, step)
    assert "".join(deltas) == raw_tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_multi_byte_characters_wait_for_their_last_byte(raw_tokenizer):
    ids = raw_tokenizer.encode("世界🎉", add_special_tokens=False).ids
    assert len(ids) > 3  # byte-level BPE splits these characters over several tokens
    deltas = stream(IncrementalDetokenizer(raw_tokenizer, SamplingParams()), ids)
    assert [d for d in deltas if d] == ["世", "界", "🎉"]


@pytest.mark.parametrize("text", TEXTS[:2])
def test_priming_with_the_prompt_keeps_the_output_exact(raw_tokenizer, hf_tokenizer, text):
    prompt = hf_tokenizer.apply_chat_template([{"role": "user", "content": "Say something 🎉"}],
                                              add_generation_prompt=True, tokenize=False)
    prompt_ids = raw_tokenizer.encode(prompt, add_special_tokens=False).ids
    ids = raw_tokenizer.encode(text, add_special_tokens=False).ids
    deltas = stream(IncrementalDetokenizer(raw_tokenizer, SamplingParams(), prompt_ids), ids)
    assert "".join(deltas) == text


def test_prompt_ending_inside_a_character_is_not_used_to_prime(raw_tokenizer):
    ids = raw_tokenizer.encode("abc 🎉🎉", add_special_tokens=False).ids
    # The prompt stops mid-emoji; its stray bytes must not show up in the output.
    deltas = stream(IncrementalDetokenizer(raw_tokenizer, SamplingParams(), ids[:-1]), [ids[-1]] + ids[:3])
    assert "".join(deltas) == raw_tokenizer.decode([ids[-1]] + ids[:3])


@pytest.mark.parametrize("skip_special", [True, False])
def test_random_token_ids_match_one_shot_decode(raw_tokenizer, skip_special):
    rng = random.Random(1234)
    params = SamplingParams(skip_special_tokens=skip_special)
    for _ in range(100):
        ids = [rng.randrange(raw_tokenizer.get_vocab_size()) for _ in range(rng.randrange(1, 30))]
        deltas = stream(IncrementalDetokenizer(raw_tokenizer, params), ids, rng.choice([1, 2, 5]))
        assert "".join(deltas) == raw_tokenizer.decode(ids, skip_special_tokens=skip_special)


def test_output_ending_inside_a_character_flushes_like_one_shot_decode(raw_tokenizer):
    ids = raw_tokenizer.encode("ok 🎉", add_special_tokens=False).ids[:-1]  # cut off the emoji's last byte
    deltas = stream(IncrementalDetokenizer(raw_tokenizer, SamplingParams()), ids)
    assert "".join(deltas) == raw_tokenizer.decode(ids)
    assert "\ufffd" not in "".join(deltas[:-1])


@pytest.mark.parametrize("skip_special", [True, False])
def test_final_stop_token_is_not_text(raw_tokenizer, hf_tokenizer, skip_special):
    eos = hf_tokenizer.eos_token_id
    ids = raw_tokenizer.encode("done.", add_special_tokens=False).ids + [eos]
    params = SamplingParams(skip_special_tokens=skip_special)
    assert "".join(stream(IncrementalDetokenizer(raw_tokenizer, params), ids, stop_token=True)) == "done."
    # A stop token that is ordinary text is dropped too...
    plain = raw_tokenizer.encode("a b c", add_special_tokens=False).ids
    assert "".join(stream(IncrementalDetokenizer(raw_tokenizer, params), plain, stop_token=True)) == "a b"
    # ...unless the request asked for its stop in the output.
    keep = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=True)
    assert "".join(stream(IncrementalDetokenizer(raw_tokenizer, keep), ids, stop_token=True)) == "done.<|im_end|>"


def test_special_tokens_skipped_or_kept(raw_tokenizer, hf_tokenizer):
    ids = [hf_tokenizer.bos_token_id] + raw_tokenizer.encode("hi", add_special_tokens=False).ids
    assert "".join(stream(IncrementalDetokenizer(raw_tokenizer, SamplingParams()), ids)) == "hi"
    keep = SamplingParams(skip_special_tokens=False)
    assert "".join(stream(IncrementalDetokenizer(raw_tokenizer, keep), ids)) == "<|im_start|>hi"


def test_token_texts_for_logprobs(raw_tokenizer):
    texts = TokenTexts(raw_tokenizer)
    ids = raw_tokenizer.encode(" hello world", add_special_tokens=False).ids
    assert "".join(texts(ids)) == " hello world"
    assert texts(ids + ids[:1]) == texts(ids) + texts(ids[:1])
