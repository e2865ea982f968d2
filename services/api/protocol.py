"""OpenAI request bodies as pydantic models.

Strict types (JSON has no "1" for 1, no NaN), so a wrong type is a 400 naming its field instead of a value
that surprises the sampler. Integers are bounded to what the wire carries: token ids travel as int32, every
other integer as a msgpack int64.

A top-level field is one of three kinds (`unexpected_field`): a field of the model below (OpenAI's, or one
of the vendor extensions vLLM users send: top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos,
min_tokens, skip_special_tokens, include_stop_str_in_output, prompt_logprobs, add_generation_prompt,
continue_final_message, chat_template_kwargs); an OpenAI field that cannot change the output (metadata, store, service_tier, ...),
accepted and ignored; or anything else, a 400 naming it, so a request never silently gets an answer to a
different question (a `response_format` or `tools` that is ignored, a misspelt `max_token`). OpenAI
fields this server does not implement pass when they carry their neutral value (null, {}, [], best_of 1).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

ROLES = ("system", "user", "assistant", "tool", "developer")

Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    # OpenAI fields that do not change what is generated: accepted and ignored.
    IGNORED_FIELDS: ClassVar[frozenset[str]] = frozenset()
    # OpenAI fields not implemented here: refused unless they hold their neutral value.
    UNSUPPORTED_FIELDS: ClassVar[dict[str, tuple[Any, ...]]] = {}


_NEUTRAL = (None, {}, [], "")


def unexpected_field(model: type[_Body], body: dict[str, Any]) -> tuple[str, str] | None:
    """(field, why) for the first top-level field of `body` that `model` neither reads nor may ignore."""
    for key, value in body.items():
        if key in model.model_fields or key in model.IGNORED_FIELDS:
            continue
        if key in model.UNSUPPORTED_FIELDS:
            if value in model.UNSUPPORTED_FIELDS[key]:
                continue
            return key, f"'{key}' is not supported by this server."
        return key, f"Unrecognized request argument '{key}'."
    return None


class StreamOptions(_Body):
    include_usage: bool | None = False


class ChatMessage(_Body):
    role: str
    # A string, or a list of {"type": "text", "text": ...} parts (the tokenizer joins them).
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"{role!r} is not a supported role; use one of {', '.join(ROLES)}.")
        return role

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            for part in content:
                if part.get("type") != "text":
                    raise ValueError(f"content part type {part.get('type')!r} is not supported; this server "
                                     "accepts only text parts.")
                if not isinstance(part.get("text"), str):
                    raise ValueError("a text content part needs a string `text`.")
        return content

    def to_wire(self) -> dict[str, object]:
        return self.model_dump(exclude_none=True)


class SamplingBody(_Body):
    """The fields completions and chat completions share."""

    model: str | None = None  # None: the served model
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int32 | None = None
    min_p: float | None = None
    seed: Seed | None = None
    n: Int32 = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    min_tokens: Int32 = 0
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


_OPENAI_NO_EFFECT = frozenset({"metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})


class CompletionRequest(SamplingBody):
    IGNORED_FIELDS = _OPENAI_NO_EFFECT
    UNSUPPORTED_FIELDS = {"best_of": (*_NEUTRAL, 1), "logit_bias": _NEUTRAL, "suffix": _NEUTRAL}
    # One prompt (text or token ids) or a batch of them.
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: Int32 | None = 16
    logprobs: Int32 | None = None
    echo: bool = False
    prompt_logprobs: Int32 | None = None  # vLLM's: top logprobs of every prompt token (scoring)


class ChatCompletionRequest(SamplingBody):
    IGNORED_FIELDS = _OPENAI_NO_EFFECT | {"parallel_tool_calls"}
    UNSUPPORTED_FIELDS = {
        "logit_bias": _NEUTRAL, "tools": _NEUTRAL, "functions": _NEUTRAL, "tool_choice": (*_NEUTRAL, "none"),
        "function_call": (*_NEUTRAL, "none"), "response_format": (*_NEUTRAL, {"type": "text"}),
        "audio": _NEUTRAL, "modalities": (*_NEUTRAL, ["text"]), "prediction": _NEUTRAL,
        "reasoning_effort": _NEUTRAL, "web_search_options": _NEUTRAL, "verbosity": _NEUTRAL,
    }
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Int32 | None = None
    max_completion_tokens: Int32 | None = None
    logprobs: bool | None = False
    top_logprobs: Int32 | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeBody(_Body):
    """/tokenize: exactly one of prompt / messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeBody(_Body):
    model: str | None = None
    tokens: list[TokenId]
