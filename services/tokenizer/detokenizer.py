"""Incremental detokenization of one request's output, with stop strings.

`tokenizers.decoders.DecodeStream` buffers ids until they decode to whole UTF-8 characters, so deltas never
carry U+FFFD mid-stream and concatenate to the one-shot decode. Stop strings are matched on the text: while
streaming, the last max(len(stop)) - 1 characters are held back so a stop string never leaks in a delta.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from headrace.common.sampling_params import SamplingParams

_REPLACEMENT = "\ufffd"
# Prompt tokens fed to the stream first, so the first output token decodes in context (e.g. SentencePiece's
# leading space is kept); fewer if a suffix would start or end inside a multi-byte character.
_MIN_PRIME, _MAX_PRIME = 4, 16


class Detokenized(NamedTuple):
    text: str  # new text to send (may be "" while a character or a possible stop string is pending)
    stop_string: str | None  # the stop string that matched: the request is finished


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, prompt_token_ids: Sequence[int] = ()):
        self._tokenizer = tokenizer
        self._skip_special = params.skip_special_tokens
        self._stream = DecodeStream(self._prime(prompt_token_ids), skip_special_tokens=self._skip_special)
        self._pending_ids: list[int] = []  # ids the stream holds back (an incomplete character)
        self._stops = params.stop
        self._include_stop = params.include_stop_str_in_output
        max_stop = max((len(s) for s in self._stops), default=0)
        self._context = max(max_stop - 1, 0)  # emitted chars kept so a stop string can straddle deltas
        self._hold = 0 if self._include_stop else self._context
        # The last `_context` emitted chars followed by the `_unsent` chars not emitted yet.
        self._window = ""
        self._unsent = 0
        self.finished = False

    def _prime(self, prompt: Sequence[int]) -> list[int]:
        for n in range(_MIN_PRIME, min(len(prompt), _MAX_PRIME) + 1):
            suffix = list(prompt[-n:])
            if _REPLACEMENT not in self._tokenizer.decode(suffix, skip_special_tokens=self._skip_special):
                return suffix
        short = list(prompt[-_MIN_PRIME:])
        if short and _REPLACEMENT not in self._tokenizer.decode(short, skip_special_tokens=self._skip_special):
            return short
        return []

    @property
    def has_stop_strings(self) -> bool:
        return bool(self._stops)

    def update(self, token_ids: Sequence[int], *, finished: bool = False, stop_token: bool = False) -> Detokenized:
        """Feed one step's new ids. `stop_token`: the last id is the EOS / stop token that finished the request
        (not detokenized unless include_stop_str_in_output)."""
        if self.finished:
            return Detokenized("", None)
        if stop_token and not self._include_stop:
            token_ids = token_ids[:-1]
        new_text = self._decode(token_ids, flush=finished)
        if not self._stops:
            self.finished = finished
            return Detokenized(new_text, None)
        return self._check_stops(new_text, finished)

    def _decode(self, token_ids: Sequence[int], flush: bool) -> str:
        pieces = []
        for token_id in token_ids:
            chunk = self._stream.step(self._tokenizer, token_id)
            if chunk is None:
                self._pending_ids.append(token_id)
            else:
                pieces.append(chunk)
                self._pending_ids.clear()
        if flush and self._pending_ids:
            # The output ended inside a character: emit what one-shot decoding gives (lossy) for the tail.
            pieces.append(self._tokenizer.decode(self._pending_ids, skip_special_tokens=self._skip_special))
            self._pending_ids.clear()
        return "".join(pieces)

    def _check_stops(self, new_text: str, finished: bool) -> Detokenized:
        old = self._window
        text = old + new_text
        sent_end = len(old) - self._unsent  # chars of `text` before this index were already emitted
        match = self._find_stop(text, len(old))
        if match is not None:
            start, stop = match
            end = start + len(stop) if self._include_stop else start
            self.finished = True
            return Detokenized(text[sent_end:end], stop)
        self.finished = finished
        emit_end = max(sent_end, len(text) - (0 if finished else self._hold))
        self._unsent = len(text) - emit_end
        keep = self._unsent + self._context
        self._window = text[-keep:] if keep else ""
        return Detokenized(text[sent_end:emit_end], None)

    def _find_stop(self, text: str, new_from: int) -> tuple[int, str] | None:
        """The earliest stop string that ends inside the new text (index >= new_from)."""
        best: tuple[int, str] | None = None
        for stop in self._stops:
            i = text.find(stop, max(0, new_from - len(stop) + 1))
            if i != -1 and (best is None or i < best[0]):
                best = (i, stop)
        return best


class TokenTexts:
    """Text of single tokens (for logprobs), cached: the same few thousand ids recur in every response."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_ids: Sequence[int]) -> list[str]:
        missing = [t for t in set(token_ids) if t not in self._cache]
        if missing:
            texts = self._tokenizer.decode_batch([[t] for t in missing], skip_special_tokens=False)
            self._cache.update(zip(missing, texts))
        return [self._cache[t] for t in token_ids]
