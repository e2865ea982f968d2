"""Top-level request fields: ours and vendor extensions are read, OpenAI's no-effect fields are ignored,
OpenAI fields not implemented pass only with their neutral value, and anything else is a 400 naming it."""

from __future__ import annotations

import pytest

from headrace.services.api.protocol import ChatCompletionRequest, CompletionRequest, unexpected_field

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("extra", [
    {"top_k": 5, "min_p": 0.1, "ignore_eos": True, "chat_template_kwargs": {}},  # read
    {"metadata": {"a": "b"}, "store": False, "service_tier": "auto", "parallel_tool_calls": True},  # no effect
    {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "logit_bias": None},  # neutral
])
def test_accepted_chat_fields(extra):
    assert unexpected_field(ChatCompletionRequest, {**CHAT, **extra}) is None


@pytest.mark.parametrize("extra,field,why", [
    ({"response_format": {"type": "json_object"}, "guided_json": {}, "structured_outputs": {"regex": "a"}}, None,
     None),  # read: structured outputs
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, None, None),  # read
    ({"functions": [{"name": "f"}]}, "functions", "not supported"),
    ({"logit_bias": {"50256": -100}}, "logit_bias", "not supported"),
    ({"max_token": 5}, "max_token", "Unrecognized request argument 'max_token'"),
])
def test_refused_chat_fields_name_themselves(extra, field, why):
    got = unexpected_field(ChatCompletionRequest, {**CHAT, **extra})
    if field is None:
        assert got is None
        return
    assert got is not None and got[0] == field and why in got[1]


def test_completion_fields():
    base = {"model": "m", "prompt": "x"}
    assert unexpected_field(CompletionRequest, {**base, "best_of": 1, "suffix": None, "echo": False}) is None
    assert unexpected_field(CompletionRequest, {**base, "best_of": 3})[0] == "best_of"
    assert unexpected_field(CompletionRequest, {**base, "messages": []})[0] == "messages"
