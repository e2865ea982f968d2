"""Request bodies: strict JSON types, wire-safe integer bounds, the prompt forms, chat messages."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from headrace.services.api.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, TokenizeBody


@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2, 3], [[1], [2, 3]]])
def test_every_prompt_form_parses_as_given(prompt):
    assert CompletionRequest.model_validate({"prompt": prompt}).prompt == prompt


@pytest.mark.parametrize("field, value", [
    ("n", "2"), ("n", 2.0), ("n", True), ("max_tokens", 2**40), ("temperature", "0.5"), ("temperature", float("inf")),
    ("echo", 1), ("seed", 2**63), ("stop_token_ids", [2**31]), ("stop_token_ids", [-1]), ("prompt", [[1, "2"]]),
])
def test_lax_coercions_and_unencodable_numbers_are_rejected(field, value):
    body = {"prompt": "x", field: value}
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(body)


def test_ints_are_accepted_for_floats_and_unknown_fields_ignored():
    req = CompletionRequest.model_validate({"prompt": "x", "temperature": 1, "logit_bias": {"5": 1}, "suffix": "!"})
    assert req.temperature == 1.0 and not hasattr(req, "logit_bias")
    assert req.max_tokens == 16 and req.n == 1 and not req.stream and not req.include_usage


def test_include_usage_needs_stream_options():
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True}
    assert not ChatCompletionRequest.model_validate(body).include_usage
    body["stream_options"] = {"include_usage": True}
    assert ChatCompletionRequest.model_validate(body).include_usage


def test_chat_messages_keep_template_fields_and_drop_nulls():
    tool_call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    req = ChatCompletionRequest.model_validate({"messages": [
        {"role": "developer", "content": "rules"},
        {"role": "assistant", "content": None, "tool_calls": [tool_call]},
        {"role": "tool", "content": "42", "tool_call_id": "c1", "extra": "dropped"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]})
    assert [m.to_wire() for m in req.messages] == [
        {"role": "developer", "content": "rules"},
        {"role": "assistant", "tool_calls": [tool_call]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]


@pytest.mark.parametrize("message", [
    {"role": "robot", "content": "x"},
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]},
    {"role": "user", "content": [{"type": "text"}]},
    {"role": "user", "content": [{"type": "text", "text": "a"}, "b"]},
])
def test_bad_messages_are_rejected(message):
    with pytest.raises(ValidationError):
        ChatMessage.model_validate(message)


def test_tokenize_body_defaults():
    body = TokenizeBody.model_validate({"prompt": "x"})
    assert body.add_special_tokens and body.add_generation_prompt and not body.return_token_strs
    assert body.messages is None
