"""Tool calls read out of a reply that is still being written, so a stream can send each call as it forms:
its name once the name is whole, then the raw text of its arguments as the model writes it.

`read_calls(plan, text, final)` is a pure function of the text so far, and what it returns for a prefix of a
reply is a prefix of what it returns for the whole reply (content and each call's arguments only grow; a
call appears once its name is whole and stays). A stream sends the growth since its last chunk; the whole
reply is `read_calls(..., final=True)` of its text; so the stream's pieces, joined, are exactly the
non-streamed message. That is why arguments are the model's own text (a slice of the reply), never the
arguments parsed and dumped again: re-serialising would change escapes and spacing the stream already sent.

vLLM's tool parsers parse a partial JSON prefix on every delta and diff the re-dumped arguments against what
they sent; scanning the raw text for the spans instead needs no partial-JSON library and cannot disagree
with itself. Each delta rescans the reply (regex scans, a few hundred matches for a typical call).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
# Inside a bracketed value: whole strings (skipped), brackets (counted), or an unterminated string's quote.
_STRUCTURE = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]|"', re.DOTALL)
_SCALAR = re.compile(r'[^\s,\]}]*')
_SPACE = re.compile(r'\s*')
_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_TAG = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"


class _Malformed(Exception):
    """The text is not the JSON a call should be: reading stops where it went wrong."""


@dataclass
class CallText:
    """One call as far as the reply has written it: `name` once whole, `arguments` as raw JSON text so far,
    `done` once its object is closed."""

    name: str
    arguments: str
    done: bool


@dataclass
class _Object:
    """Where a call object's parts lie in the text; None for what is not written yet."""

    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    end: int | None = None


def read_calls(mode: str, parser: str | None, name: str | None, text: str, final: bool
               ) -> tuple[str, list[CallText]]:
    """(content, calls) of a reply so far. `mode` is the ToolPlan's: "named" (the reply is `name`'s
    arguments), "required" (a JSON array of {"name", "arguments"}) or "auto" (as `parser` writes calls).
    Mid-stream (`final` false) content holds back what may yet turn out to open a call."""
    if mode == "named":
        return "", [CallText(name or "", text, final)]
    if mode == "required":
        return "", _sequence(text, 0, final)
    if parser == "hermes":
        return _hermes(text, final)
    if parser == "mistral":
        return _after_tag(text, MISTRAL_TAG, final)
    return _llama3_json(text, final)


def _hermes(text: str, final: bool) -> tuple[str, list[CallText]]:
    start = text.find(_HERMES_OPEN)
    if start < 0:
        return _held_content(text, _HERMES_OPEN, final), []
    calls: list[CallText] = []
    while start >= 0:
        body = start + len(_HERMES_OPEN)
        close = text.find(_HERMES_CLOSE, body)
        region = text[:close] if close >= 0 else text
        calls += _sequence(region, body, final or close >= 0, limit=1)
        if close < 0:
            break
        start = text.find(_HERMES_OPEN, close)
    return text[:text.find(_HERMES_OPEN)].rstrip(), calls


def _after_tag(text: str, tag: str, final: bool) -> tuple[str, list[CallText]]:
    start = text.find(tag)
    if start < 0:
        return _held_content(text, tag, final), []
    return text[:start].rstrip(), _sequence(text, start + len(tag), final)


def _llama3_json(text: str, final: bool) -> tuple[str, list[CallText]]:
    """The whole reply is calls when it opens (after the optional python tag) with `{`; else all content."""
    body = text.lstrip()
    tagged = body.startswith(PYTHON_TAG)
    if tagged:
        body = body[len(PYTHON_TAG):].lstrip()
    if not final and (not body or not tagged and PYTHON_TAG.startswith(body)):
        return "", []  # nothing yet, or maybe the tag
    if body.startswith("{"):
        return "", _sequence(body, 0, final)
    return text, []


def _held_content(text: str, marker: str, final: bool) -> str:
    """Content before any call. Mid-stream its trailing whitespace and any start of `marker` wait: a call
    may follow, and a reply with calls keeps no whitespace before them."""
    if final:
        return text
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            text = text[:-n]
            break
    return text.rstrip()


def _sequence(text: str, pos: int, final: bool, limit: int | None = None) -> list[CallText]:
    """Call objects from `pos` on: one after another, or in a JSON array, separated by whitespace, ',' or
    ';' (the forms the parsers' model families write)."""
    calls: list[CallText] = []
    depth = 0
    try:
        while limit is None or len(calls) < limit:
            pos = _skip(text, pos, " \t\r\n,;" + ("]" if depth else ""))
            if pos >= len(text):
                break
            if text[pos] == "[" and not depth:
                depth, pos = 1, pos + 1
                continue
            if text[pos] != "{":
                raise _Malformed
            obj = _object(text, pos, final)
            if obj.name is not None:
                calls.append(_call_text(text, obj))
            if obj.end is None:
                break
            pos = obj.end
    except (_Malformed, ValueError):  # ValueError: a bad escape in a key or a string
        pass
    return calls


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _call_text(text: str, obj: _Object) -> CallText:
    done = obj.end is not None
    if obj.args_start is None:  # no arguments written (yet): a call without them takes none
        return CallText(obj.name or "", "{}" if done else "", done)
    if text[obj.args_start] in "{[":  # streamed as written
        end = obj.args_end if obj.args_end is not None else len(text)
        return CallText(obj.name or "", text[obj.args_start:end], done)
    if obj.args_end is None:  # a string (or scalar) value: sent once whole
        return CallText(obj.name or "", "", done)
    raw = text[obj.args_start:obj.args_end]
    value = json.loads(raw)
    return CallText(obj.name or "", value if isinstance(value, str) else raw, done)


def _object(text: str, pos: int, final: bool) -> _Object:
    """The parts of the object opening at `pos`, as far as it is written."""
    obj = _Object()
    pos += 1
    while True:
        pos = _SPACE.match(text, pos).end()
        if pos >= len(text):
            return obj
        if text[pos] == "}":
            obj.end = pos + 1
            return obj
        key = _STRING.match(text, pos)
        if key is None:
            if text[pos] != '"':
                raise _Malformed
            return obj  # a key still being written
        pos = _SPACE.match(text, key.end()).end()
        if pos >= len(text):
            return obj
        if text[pos] != ":":
            raise _Malformed
        start = _SPACE.match(text, pos + 1).end()
        if start >= len(text):
            return obj
        end = _value_end(text, start, final)
        _note(obj, json.loads(key.group()), text, start, end)
        if end is None:
            return obj
        pos = _SPACE.match(text, end).end()
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] != "}":
            raise _Malformed


def _note(obj: _Object, key: str, text: str, start: int, end: int | None) -> None:
    if key == "name" and end is not None and obj.name is None:
        value = json.loads(text[start:end])
        if not isinstance(value, str):
            raise _Malformed
        obj.name = value
    elif key in ("arguments", "parameters") and obj.args_start is None:
        obj.args_start, obj.args_end = start, end


def _value_end(text: str, pos: int, final: bool) -> int | None:
    """Where the JSON value opening at `pos` ends, or None while it is not whole yet."""
    first = text[pos]
    if first == '"':
        match = _STRING.match(text, pos)
        return match.end() if match else None
    if first in "{[":
        depth = 0
        for match in _STRUCTURE.finditer(text, pos):
            token = match.group()
            if token == '"':
                return None  # an unterminated string: the rest is still being written
            if token in "{[":
                depth += 1
            elif token in "}]":
                depth -= 1
                if depth == 0:
                    return match.end()
        return None
    end = _SCALAR.match(text, pos).end()
    if end == pos:
        raise _Malformed
    return end if end < len(text) or final else None  # a number may still be growing
