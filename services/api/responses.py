"""OpenAI response bodies and stream chunks, built from each choice's accumulated deltas.

`CompletionShape` (/v1/completions, object "text_completion") and `ChatShape` (/v1/chat/completions,
"chat.completion" / "chat.completion.chunk") differ only in how a choice, its delta and its logprobs look.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from headrace.common.messages import PromptLogprobsText, TextDelta, TokenLogprobs
from headrace.services.api.reasoning import split_reasoning
from headrace.services.api.tool_stream import CallText
from headrace.services.api.tools import ToolPlan, call_id

# JSON has no -inf; a token the model ruled out reports this instead (vLLM does the same).
_MIN_LOGPROB = -9999.0


def _logprob(value: float) -> float:
    return value if math.isfinite(value) and value > _MIN_LOGPROB else _MIN_LOGPROB


@dataclass
class ChoiceState:
    """One choice's output so far."""

    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    # Characters of echoed prompt before the first output token, and (streaming) before the next token:
    # completions' logprobs.text_offset.
    echo_chars: int = 0
    text_offset: int = 0
    prompt_logprobs: PromptLogprobsText | None = None  # scoring requests: from the first delta
    # Streaming with --reasoning-parser or tools: characters of reasoning and of content already sent, and
    # per tool call whose name went out, the characters of its arguments sent.
    reasoning_sent: int = 0
    content_sent: int = 0
    call_args_sent: list[int] = field(default_factory=list)

    def add(self, delta: TextDelta) -> str:
        """Fold one delta in; return the text it adds (the echoed prompt first, on its first delta)."""
        text = delta.text
        if delta.prompt_text is not None:
            text = delta.prompt_text + text
            self.echo_chars = self.text_offset = len(delta.prompt_text)
        if text:
            self.text.append(text)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.num_prompt_tokens = delta.num_prompt_tokens or self.num_prompt_tokens
        self.num_output_tokens = max(self.num_output_tokens, delta.num_output_tokens)
        if delta.finished:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
        return text

    @property
    def full_text(self) -> str:
        return "".join(self.text)


def usage(states: list[ChoiceState], n: int) -> dict[str, int]:
    """Prompt tokens once per prompt (its n choices share it); completion tokens summed over every choice."""
    prompt = sum(max(s.num_prompt_tokens for s in states[p:p + n]) for p in range(0, len(states), n))
    completion = sum(s.num_output_tokens for s in states)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Shape:
    object: str
    chunk_object: str

    def __init__(self, request_id: str, created: int, model: str, *, logprobs: bool, include_usage: bool):
        self.request_id, self.created, self.model = request_id, created, model
        self.want_logprobs = logprobs
        self.include_usage = include_usage

    def view(self, delta: TextDelta) -> TextDelta:
        """The delta as this response shows it (a scoring-only request drops its one generated token)."""
        return delta

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    def response(self, states: list[ChoiceState], n: int) -> dict[str, Any]:
        body = self._envelope(self.object, [self._choice(s) for s in states])
        body["usage"] = usage(states, n)
        return body

    def start_chunks(self, num_choices: int) -> list[dict[str, Any]]:
        return []

    def delta_chunks(self, state: ChoiceState, text: str, delta: TextDelta) -> list[dict[str, Any]]:
        """The chunk for one delta. Like vLLM, a new token gets a chunk even when it adds no text yet (a
        partial UTF-8 character, text held back for a stop string): clients see progress per token and
        time-to-first-token means the first token. Only a delta with no token and no finish is dropped."""
        logprobs = delta.logprobs if self.want_logprobs else None
        if not text and not delta.finished and not logprobs and not delta.token_ids:
            return []
        return [self._chunk(self._delta_choice(state, text, logprobs, delta))]

    def usage_chunk(self, states: list[ChoiceState], n: int) -> dict[str, Any]:
        chunk = self._envelope(self.chunk_object, [])
        chunk["usage"] = usage(states, n)
        return chunk

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = self._envelope(self.chunk_object, [choice])
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI: every chunk has the key; only the last one fills it
        return chunk

    def _choice(self, state: ChoiceState) -> dict[str, Any]:
        raise NotImplementedError

    def _delta_choice(self, state: ChoiceState, text: str, logprobs: list[TokenLogprobs] | None,
                      delta: TextDelta) -> dict[str, Any]:
        raise NotImplementedError


class CompletionShape(Shape):
    """`echo` with `logprobs` puts the prompt's tokens first in the logprobs block (OpenAI's legacy shape:
    the first prompt token has no logprob); `prompt_logprobs` adds vLLM's per-choice list; `score_only`
    (max_tokens 0) answers with the prompt alone, dropping the one token the engine generates."""

    object = chunk_object = "text_completion"

    def __init__(self, request_id: str, created: int, model: str, *, logprobs: int | None, include_usage: bool,
                 echo: bool = False, prompt_logprobs: int | None = None, score_only: bool = False):
        super().__init__(request_id, created, model, logprobs=logprobs is not None, include_usage=include_usage)
        self.num_logprobs = logprobs or 0
        self.echo_logprobs = echo and logprobs is not None
        self.num_prompt_logprobs = prompt_logprobs
        self.score_only = score_only

    def view(self, delta: TextDelta) -> TextDelta:
        if not self.score_only:
            return delta
        return dataclasses.replace(delta, text="", token_ids=[], logprobs=None, num_output_tokens=0,
                                   finish_reason="length" if delta.finished and delta.error is None
                                   else delta.finish_reason, stop_reason=None)

    def _choice(self, state: ChoiceState) -> dict[str, Any]:
        logprobs = None
        if self.want_logprobs:
            logprobs = _completion_logprobs(state.logprobs, state.echo_chars)
            if self.echo_logprobs and state.prompt_logprobs is not None:
                logprobs = _joined(_echoed_prompt_logprobs(state.prompt_logprobs, self.num_logprobs), logprobs)
        choice = {"index": state.index, "text": state.full_text, "logprobs": logprobs,
                  "finish_reason": state.finish_reason, "stop_reason": state.stop_reason}
        return self._with_prompt_logprobs(choice, state.prompt_logprobs)

    def _delta_choice(self, state: ChoiceState, text: str, logprobs: list[TokenLogprobs] | None,
                      delta: TextDelta) -> dict[str, Any]:
        block = None
        if self.want_logprobs:
            block = _completion_logprobs(logprobs or [], state.text_offset)
            state.text_offset += sum(len(lp.token) for lp in logprobs or [])
            if self.echo_logprobs and delta.prompt_logprobs is not None:
                block = _joined(_echoed_prompt_logprobs(delta.prompt_logprobs, self.num_logprobs), block)
        choice = {"index": state.index, "text": text, "logprobs": block,
                  "finish_reason": delta.finish_reason if delta.finished else None,
                  "stop_reason": delta.stop_reason if delta.finished else None}
        return self._with_prompt_logprobs(choice, delta.prompt_logprobs)

    def _with_prompt_logprobs(self, choice: dict[str, Any], prompt: PromptLogprobsText | None) -> dict[str, Any]:
        if self.num_prompt_logprobs is not None and prompt is not None:
            choice["prompt_logprobs"] = _vllm_prompt_logprobs(prompt, self.num_prompt_logprobs)
        return choice


class ChatShape(Shape):
    """Chat bodies. With a tool plan the reply's text becomes `tool_calls` where it holds calls; with a
    reasoning parser its <think> part becomes `reasoning_content`."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, *args: Any, tools: ToolPlan | None = None, reasoning_parser: str | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tools = tools
        self.reasoning_parser = reasoning_parser

    def _choice(self, state: ChoiceState) -> dict[str, Any]:
        reasoning, content, calls = self._parts(state.full_text, state.finish_reason)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self.reasoning_parser:
            message["reasoning_content"] = reasoning or None
        if self.tools is not None:
            message["tool_calls"] = calls
        return {"index": state.index, "message": message,
                "logprobs": _chat_logprobs(state.logprobs) if self.want_logprobs else None,
                "finish_reason": _finish(state.finish_reason, calls), "stop_reason": state.stop_reason}

    def _parts(self, text: str, finish_reason: str | None) -> tuple[str, str | None, list[dict[str, Any]]]:
        """(reasoning, content, tool calls) of a whole reply."""
        reasoning, content = split_reasoning(self.reasoning_parser, text) if self.reasoning_parser else ("", text)
        if self.tools is None:
            return reasoning, content, []
        try:
            extracted, calls = self.tools.extract(content)
        except (ValueError, KeyError, TypeError):  # a forced call cut short by max_tokens: leave the text
            return reasoning, content, []
        return reasoning, extracted, calls

    def start_chunks(self, num_choices: int) -> list[dict[str, Any]]:
        # OpenAI opens every choice with the role and empty content.
        return [self._chunk({"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}) for k in range(num_choices)]

    def delta_chunks(self, state: ChoiceState, text: str, delta: TextDelta) -> list[dict[str, Any]]:
        if self.tools is not None or self.reasoning_parser:
            return self._parsed_chunks(state, delta)
        return super().delta_chunks(state, text, delta)

    def _parsed_chunks(self, state: ChoiceState, delta: TextDelta) -> list[dict[str, Any]]:
        """What the reply's reasoning, content and tool calls gained since the last chunk: a call's name
        (with its id) once whole, then its arguments as they are written; then the finish. Joined, the
        chunks give exactly the non-streamed message (for calls that finish whole and well-formed)."""
        final = delta.finished
        reasoning, content = (split_reasoning(self.reasoning_parser, state.full_text, final)
                              if self.reasoning_parser else ("", state.full_text))
        calls: list[CallText] = []
        if self.tools is not None:
            content, calls = self._calls_so_far(state, content, final)
        out: dict[str, Any] = {}
        if len(reasoning) > state.reasoning_sent:
            out["reasoning_content"] = reasoning[state.reasoning_sent:]
            state.reasoning_sent = len(reasoning)
        if len(content) > state.content_sent:
            out["content"] = content[state.content_sent:]
            state.content_sent = len(content)
        deltas = ([out] if out else []) + _call_deltas(state, calls)
        chunks = [self._chunk({"index": state.index, "delta": d, "logprobs": None, "finish_reason": None})
                  for d in deltas]
        if final:
            chunks.append(self._chunk({"index": state.index, "delta": {}, "logprobs": None,
                                       "finish_reason": _finish(delta.finish_reason, calls),
                                       "stop_reason": delta.stop_reason}))
        return chunks

    def _calls_so_far(self, state: ChoiceState, text: str, final: bool) -> tuple[str, list[CallText]]:
        """(content, calls) to have sent by now. At the end of a reply whose calls never started, the whole
        message decides (its text is content when its calls do not parse); once a call went out, the scan
        that sent it decides to the end."""
        assert self.tools is not None
        if not final or state.call_args_sent:
            return self.tools.read(text, final)
        content, calls = self.tools.extract(text)
        return content or "", [CallText(c["function"]["name"], c["function"]["arguments"], True) for c in calls]

    def _delta_choice(self, state: ChoiceState, text: str, logprobs: list[TokenLogprobs] | None,
                      delta: TextDelta) -> dict[str, Any]:
        # Every token carries content (even ""); a bare finish marker carries none.
        content = {"content": text} if text or not delta.finished else {}
        choice: dict[str, Any] = {"index": state.index, "delta": content,
                                  "logprobs": _chat_logprobs(logprobs or []) if self.want_logprobs else None,
                                  "finish_reason": delta.finish_reason if delta.finished else None}
        if delta.finished:
            choice["stop_reason"] = delta.stop_reason
        return choice


def _call_deltas(state: ChoiceState, calls: list[CallText]) -> list[dict[str, Any]]:
    """Each call's news as OpenAI streams it: its first delta has the index, id, type and name (arguments
    ""), the next ones pieces of its arguments."""
    out: list[dict[str, Any]] = []
    for i, call in enumerate(calls):
        if i == len(state.call_args_sent):
            out.append({"tool_calls": [{"index": i, "id": call_id(), "type": "function",
                                        "function": {"name": call.name, "arguments": ""}}]})
            state.call_args_sent.append(0)
        sent = state.call_args_sent[i]
        if len(call.arguments) > sent:
            out.append({"tool_calls": [{"index": i, "function": {"arguments": call.arguments[sent:]}}]})
            state.call_args_sent[i] = len(call.arguments)
    return out


def _finish(reason: str | None, calls: list[Any]) -> str | None:
    """OpenAI's finish for a reply that ended on its own with tool calls is "tool_calls"."""
    return "tool_calls" if calls and reason == "stop" else reason


def _completion_logprobs(logprobs: list[TokenLogprobs], offset: int) -> dict[str, Any]:
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [_logprob(lp.logprob) for lp in logprobs],
        "top_logprobs": [{t: _logprob(v) for t, v in zip(lp.top_tokens, lp.top_logprobs)} for lp in logprobs],
        "text_offset": offsets,
    }


def _chat_logprobs(logprobs: list[TokenLogprobs]) -> dict[str, Any]:
    return {"content": [
        {"token": lp.token, "logprob": _logprob(lp.logprob), "bytes": list(lp.token.encode("utf-8")),
         "top_logprobs": [{"token": t, "logprob": _logprob(v), "bytes": list(t.encode("utf-8"))}
                          for t, v in zip(lp.top_tokens, lp.top_logprobs)]}
        for lp in logprobs]}


def _joined(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    return {key: first[key] + second[key] for key in first}


def _top_of(prompt: PromptLogprobsText, i: int, n: int) -> list[tuple[int, str, float]]:
    """(token id, text, logprob) of the top n at prompt position i (which scores prompt token i + 1)."""
    scores, k = prompt.logprobs, prompt.logprobs.num_top
    lo = i * k
    return list(zip(scores.top_token_ids[lo:lo + n], prompt.top_tokens[lo:lo + n], scores.top_logprobs[lo:lo + n]))


def _echoed_prompt_logprobs(prompt: PromptLogprobsText, n: int) -> dict[str, Any]:
    """The prompt's part of an echo + logprobs block: every prompt token, the first without a logprob; each
    top_logprobs map holds the top n and the prompt token itself (as vLLM's do)."""
    scores = prompt.logprobs
    offsets, offset = [], 0
    for token in prompt.tokens:
        offsets.append(offset)
        offset += len(token)
    tops: list[dict[str, float] | None] = [None]
    for i, (token, lp) in enumerate(zip(prompt.tokens[1:], scores.token_logprobs)):
        top = {text: _logprob(v) for _, text, v in _top_of(prompt, i, n)}
        top.setdefault(token, _logprob(lp))
        tops.append(top)
    return {"tokens": list(prompt.tokens), "token_logprobs": [None] + [_logprob(v) for v in scores.token_logprobs],
            "top_logprobs": tops, "text_offset": offsets}


def _vllm_prompt_logprobs(prompt: PromptLogprobsText, n: int) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: None for the first token, then per token a map from token id to its logprob,
    rank and text, holding the top n and the prompt token itself."""
    scores = prompt.logprobs
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for i, (tid, text, lp, rank) in enumerate(zip(prompt.token_ids[1:], prompt.tokens[1:], scores.token_logprobs,
                                                  scores.token_ranks)):
        entry = {str(t): {"logprob": _logprob(v), "rank": r + 1, "decoded_token": s}
                 for r, (t, s, v) in enumerate(_top_of(prompt, i, n))}
        entry.setdefault(str(tid), {"logprob": _logprob(lp), "rank": rank, "decoded_token": text})
        out.append(entry)
    return out
