"""Tool calling for chat completions: which tools a request offers and how it may use them (`tool_choice`),
the grammar that forces a call where one is required, and the calls read back out of the model's text.

- `none` (or no tools): plain text.
- `required`: the output is constrained to a JSON array of {"name", "arguments"} objects, one per call, each
  argument object under its tool's parameter schema, so it always parses. The array holds one call when
  `parallel_tool_calls` is false and at most MAX_PARALLEL_CALLS otherwise: vLLM's array has no upper bound,
  and a small model then repeats its call until max_tokens; a bound makes the grammar close the array.
- a named function: the output is constrained to that tool's arguments object.
- `auto` (needs --enable-auto-tool-choice): the model writes what it likes; --tool-call-parser reads calls in
  the format its family was trained on (`hermes`: <tool_call>{...}</tool_call>, `llama3_json`: a bare
  {"name", "parameters"} object, `mistral`: [TOOL_CALLS][...]) and whatever does not parse stays content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from headrace.common.messages import GrammarSpec
from headrace.services.api.errors import ApiError
from headrace.services.api.tool_stream import MISTRAL_TAG, PYTHON_TAG, CallText, read_calls

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
# The most calls one `required` reply may hold when parallel calls are allowed.
MAX_PARALLEL_CALLS = 8


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses its tools."""

    mode: str  # "auto", "required" or "named" (no plan at all for "none")
    tools: tuple[dict[str, Any], ...]  # each tool's `function` object
    name: str | None = None  # the named function
    parallel: bool = True
    parser: str | None = None  # --tool-call-parser, for "auto"

    def grammar(self) -> GrammarSpec | None:
        """The constraint that makes a required or named call parse; None for auto."""
        if self.mode == "named":
            return GrammarSpec("json_schema", json.dumps(_parameters(self._tool(self.name))), "tool_choice")
        if self.mode == "required":
            calls = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["name"]},
                                                                 "arguments": _parameters(t)},
                                "required": ["name", "arguments"], "additionalProperties": False}
                               for t in self.tools]}
            schema = {"type": "array", "items": calls, "minItems": 1,
                      "maxItems": MAX_PARALLEL_CALLS if self.parallel else 1}
            return GrammarSpec("json_schema", json.dumps(schema), "tools")
        return None

    def _tool(self, name: str | None) -> dict[str, Any]:
        return next(t for t in self.tools if t["name"] == name)

    def read(self, text: str, final: bool) -> tuple[str, list[CallText]]:
        """(content, calls) of the reply so far, as a stream sends them (tool_stream.py)."""
        content, calls = read_calls(self.mode, self.parser, self.name, text, final)
        if self.mode == "auto":  # a call to a function not offered is not ours: the calls end before it
            known = {t["name"] for t in self.tools}
            calls = calls[:next((i for i, c in enumerate(calls) if c.name not in known), len(calls))]
        return content, calls

    def extract(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool calls in OpenAI's shape) from the model's whole output: what `read` gives for the
        whole text when every call in it is whole and well-formed, else the text as content (a forced call
        cut short by max_tokens, an auto reply whose calls do not parse or name a function not offered)."""
        content, calls = self.read(text, final=True)
        if not self._well_formed(text, calls):
            return text, []
        return content or None, [tool_call(c.name, c.arguments) for c in calls]

    def _well_formed(self, text: str, calls: list[CallText]) -> bool:
        try:
            if not calls or not all(c.done and isinstance(json.loads(c.arguments), dict) for c in calls):
                return False
            if self.mode == "named":
                return True
            if self.mode == "required":
                return len(json.loads(text)) == len(calls)
        except ValueError:
            return False
        _, parsed = parse_tool_calls(self.parser or "", text)
        known = {t["name"] for t in self.tools}
        return [c["function"]["name"] for c in parsed] == [c.name for c in calls] and \
            all(c.name in known for c in calls)


def tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    params = tool.get("parameters")
    return params if isinstance(params, dict) else {"type": "object", "properties": {}}


def tool_plan(tools: list[dict[str, Any]] | None, choice: str | dict[str, Any] | None, parallel: bool | None,
              auto_enabled: bool, parser: str | None) -> ToolPlan | None:
    """The request's plan, or None when its output is plain text. Checks the request's shape: a
    `tool_choice` naming no tool, or `auto` on a server not started for it, is a 400."""
    functions = _functions(tools or [])
    if choice is None:  # OpenAI's default: auto when tools are given (plain text where auto is off, as vLLM)
        choice = "auto" if functions and auto_enabled else "none"
    if choice == "none":
        return None
    if not functions:
        raise ApiError(400, "tool_choice needs tools.", param="tool_choice")
    kw = dict(tools=tuple(functions), parallel=parallel is not False, parser=parser)
    if choice == "required":
        return ToolPlan("required", **kw)
    if choice == "auto":
        if not auto_enabled:
            raise ApiError(400, '"auto" tool choice needs the server started with --enable-auto-tool-choice and '
                                "--tool-call-parser.", param="tool_choice")
        return ToolPlan("auto", **kw)
    name = _named(choice)
    if name not in {f["name"] for f in functions}:
        raise ApiError(400, f"tool_choice names the function {name!r}, which is not among the tools.",
                       param="tool_choice")
    return ToolPlan("named", name=name, **kw)


def _named(choice: Any) -> str | None:
    function = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(function, dict) \
            or not isinstance(function.get("name"), str):
        raise ApiError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                            '"function": {"name": ...}}.', param="tool_choice")
    return function["name"]


def _functions(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise ApiError(400, 'each tool must be {"type": "function", "function": {"name": ..., "parameters": '
                                "...}}.", param=f"tools.[{i}]")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise ApiError(400, "a function's parameters must be a JSON schema object.",
                           param=f"tools.[{i}].function.parameters")
        out.append(function)
    return out


# --------------------------------------------------------------------------- auto: the parsers


def parse_tool_calls(parser: str, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) as `parser`'s model family writes calls; text with no well-formed call is content."""
    if parser == "hermes":
        found = [_call(raw) for raw in _HERMES.findall(text)]
        start = text.find("<tool_call>")
        content = text[:start] if start >= 0 else text
    elif parser == "mistral":
        start = text.find(MISTRAL_TAG)
        found = _json_calls(text[start + len(MISTRAL_TAG):]) if start >= 0 else []
        content = text[:start] if start >= 0 else text
    else:  # llama3_json: the whole reply is one or more {"name", "parameters"} objects
        body = text.strip().removeprefix(PYTHON_TAG)
        found = _json_calls(body) if body.startswith("{") else []
        content = ""
    if not found or any(c is None for c in found):
        return text, []
    return (content.strip() or None), found  # type: ignore[return-value]


def _json_calls(text: str) -> list[dict[str, Any] | None]:
    """Consecutive JSON values (objects or arrays of them, separated by whitespace or ';') read as calls."""
    decoder, pos, calls = json.JSONDecoder(), 0, []
    text = text.strip()
    while pos < len(text):
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return [None]
        calls += [_call_of(v) for v in (value if isinstance(value, list) else [value])]
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
    return calls


def _call(raw: str) -> dict[str, Any] | None:
    try:
        return _call_of(json.loads(raw))
    except ValueError:
        return None


def _call_of(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    return tool_call(value["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
