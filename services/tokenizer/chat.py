"""Chat templates: validate OpenAI chat messages and render them with the model's Jinja template.

Templates come only from the model's tokenizer or the operator's --chat-template file, never from requests,
and still render in jinja2's ImmutableSandboxedEnvironment: a template cannot reach Python internals or
mutate the objects it is given.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from headrace.services.tokenizer.errors import RequestError

ROLES = ("system", "user", "assistant", "tool", "developer")
# Names the renderer sets itself; chat_template_kwargs may not override them.
_RESERVED = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token", "unk_token", "pad_token"})


class ChatTemplateError(RequestError):
    """The template refused or failed to render these messages (e.g. its raise_exception)."""


class ChatTemplateSecurityError(ChatTemplateError):
    """The template tried something the sandbox forbids."""


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Checked, normalised copies: text-part lists joined into one string; `developer` rendered as `system`
    (most templates know only system/user/assistant/tool)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty array.", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages.[{i}]"
        if not isinstance(message, Mapping):
            raise RequestError(f"{where} must be an object.", where)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"Invalid value: {role!r}. Supported values are: {', '.join(map(repr, ROLES))}.",
                               f"{where}.role")
        normalised = dict(message)
        normalised["role"] = "system" if role == "developer" else role
        normalised["content"] = _content(message.get("content"), role, message, f"{where}.content")
        if isinstance(message.get("tool_calls"), list):
            normalised["tool_calls"] = [_template_call(call) for call in message["tool_calls"]]
        out.append(normalised)
    return out


def _content(content: Any, role: str, message: Mapping[str, Any], where: str) -> str | None:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant" and message.get("tool_calls"):
        return ""  # templates without tool support concatenate content; "" is falsy for the ones with it
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise RequestError(f"Unsupported content part {kind!r}: this model accepts only text parts.",
                                   f"{where}.[{k}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise RequestError("content must be a string or an array of text parts.", where)


def _template_call(call: Any) -> Any:
    """An assistant's tool call as templates expect it: OpenAI sends `arguments` as JSON text, templates
    (Qwen's, Llama's, Mistral's) write them with `tojson`, so the text is parsed back into an object."""
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


class _GenerationTag(Extension):
    """HF templates mark assistant turns with {% generation %}...{% endgeneration %}; render the body as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Like HF's: keep non-ASCII text readable inside prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """Unsafe attribute access raises at once (the stock sandbox renders it as an empty Undefined)."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(f"access to {attribute!r} of a {type(obj).__name__} is unsafe")


def _environment() -> ImmutableSandboxedEnvironment:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """One compiled template (compiled at startup: a broken operator template fails the start, not a request)."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None):
        self._template = _environment().from_string(source)
        self._special = {k: v for k, v in (special_tokens or {}).items() if isinstance(v, str)}

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               continue_final_message: bool = False, kwargs: Mapping[str, Any] | None = None) -> str:
        """Render validated messages (see validate_messages)."""
        if continue_final_message and add_generation_prompt:
            raise RequestError("continue_final_message and add_generation_prompt cannot both be true.",
                               "continue_final_message")
        extra = dict(kwargs or {})
        if reserved := _RESERVED.intersection(extra):
            raise RequestError(f"chat_template_kwargs may not set {sorted(reserved)}.", "chat_template_kwargs")
        try:
            text = self._template.render(**extra, **self._special, messages=messages,
                                         add_generation_prompt=add_generation_prompt)
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateSecurityError(f"chat template violated the sandbox: {e}", "messages", 500,
                                            "InternalServerError") from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template error: {e}", "messages") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            # Templates assume shapes (e.g. string content); messages that break them are the request's fault.
            raise ChatTemplateError(f"chat template failed on these messages: {e}", "messages") from None
        if continue_final_message:
            text = _cut_after_final(text, messages[-1])
        return text


def _cut_after_final(text: str, final: Mapping[str, Any]) -> str:
    # Leave the final (assistant) message open so generation continues it: drop what follows its content.
    content = (final.get("content") or "").rstrip()
    if final.get("role") != "assistant" or not content or (i := text.rfind(content)) == -1:
        raise RequestError("continue_final_message needs a final assistant message with text content.",
                           "continue_final_message")
    return text[: i + len(content)]
