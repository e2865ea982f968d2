"""Stop strings: never leak into a delta, truncate on a match, optionally include the stop string."""

from __future__ import annotations

import random

import pytest

from headrace.common.sampling_params import SamplingParams
from headrace.services.tokenizer.detokenizer import IncrementalDetokenizer


def run(raw_tokenizer, text: str, stop: tuple[str, ...], include: bool = False, step: int = 1):
    """Stream `text` token by token: (deltas, stop string, index of the update that matched)."""
    ids = raw_tokenizer.encode(text, add_special_tokens=False).ids
    detok = IncrementalDetokenizer(raw_tokenizer, SamplingParams(stop=stop, include_stop_str_in_output=include))
    deltas, matched, at = [], None, None
    chunks = [ids[i:i + step] for i in range(0, len(ids), step)]
    for k, chunk in enumerate(chunks):
        out = detok.update(chunk, finished=k == len(chunks) - 1)
        deltas.append(out.text)
        if out.stop_string is not None:
            matched, at = out.stop_string, k
            break
    return deltas, matched, at


def test_stop_string_is_cut_and_never_leaks(raw_tokenizer):
    deltas, matched, _ = run(raw_tokenizer, "The answer is 42. STOP and then more text", ("STOP",))
    assert matched == "STOP"
    assert "".join(deltas) == "The answer is 42. "
    # While streaming, no delta ever showed a prefix of the stop string's characters past the cut.
    assert all("S" not in d for d in deltas)


def test_include_stop_str_in_output(raw_tokenizer):
    deltas, matched, _ = run(raw_tokenizer, "The answer is 42. STOP and then more text", ("STOP",), include=True)
    assert matched == "STOP"
    assert "".join(deltas) == "The answer is 42. STOP"


def test_stop_string_spanning_tokens_and_deltas(raw_tokenizer):
    text = "Hello world, hello again"
    stop = "lo wor"  # starts inside " Hello"'s token and ends inside " world"'s
    deltas, matched, _ = run(raw_tokenizer, text, (stop,))
    assert matched == stop and "".join(deltas) == "Hel"


def test_earliest_stop_wins_and_later_updates_are_empty(raw_tokenizer):
    ids = raw_tokenizer.encode("one two three four", add_special_tokens=False).ids
    detok = IncrementalDetokenizer(raw_tokenizer, SamplingParams(stop=("four", "two")))
    out = detok.update(ids)  # a whole multi-token step at once
    assert out == ("one ", "two")
    assert detok.finished and detok.update(ids, finished=True) == ("", None)


def test_hold_back_is_released_when_no_stop_matches(raw_tokenizer):
    text = "abcdef ghijkl mnopqr"
    deltas, matched, _ = run(raw_tokenizer, text, ("zzzzz",))
    assert matched is None and "".join(deltas) == text
    assert len("".join(deltas[:-1])) <= len(text) - 4  # the last len(stop) - 1 chars waited for the end


def test_multi_byte_text_with_a_stop_string(raw_tokenizer):
    deltas, matched, _ = run(raw_tokenizer, "héllo 世界 🎉 END of 世界", ("END",))
    assert matched == "END" and "".join(deltas) == "héllo 世界 🎉 "
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("include", [False, True])
def test_random_texts_and_splits_match_a_one_shot_cut(raw_tokenizer, include):
    rng = random.Random(7)
    words = ["alpha", "beta", "γάμμα", "世界", "🎉", "stop", "STOP!", "\n", "end.", " "]
    for _ in range(60):
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(3, 25)))
        stops = tuple(rng.sample(["STOP!", "end.", "a b", "界 🎉", "γά"], 2))
        deltas, matched, _ = run(raw_tokenizer, text, stops, include, step=rng.choice([1, 2, 4]))
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            i, s = min(hits)
            assert matched == s
            assert "".join(deltas) == text[: i + len(s) if include else i]
        else:
            assert matched is None and "".join(deltas) == text


def test_tokens_after_a_stop_string_in_one_output_are_cut(raw_tokenizer):
    """Speculative decoding sends several tokens in one output: those past the stop string's last token are
    not the request's (they would never have been sampled one at a time), nor counted."""
    from headrace.common.messages import RequestOutput
    from headrace.services.tokenizer.text_codec import OutputText

    ids = raw_tokenizer.encode("The answer is 42. STOP and then more text", add_special_tokens=False).ids
    params = SamplingParams(stop=("STOP",))
    one_by_one = run(raw_tokenizer, "The answer is 42. STOP and then more text", ("STOP",))
    output = OutputText(IncrementalDetokenizer(raw_tokenizer, params), None)
    first = RequestOutput("r", ids[:3])
    rest = RequestOutput("r", ids[3:])
    texts = [output.update(first).text]
    update = output.update(rest)
    assert update.stop_string == "STOP" and "".join(texts + [update.text]) == "".join(one_by_one[0])
    assert 3 + len(rest.new_token_ids) == one_by_one[2] + 1  # the token that completed "STOP" is the last kept
