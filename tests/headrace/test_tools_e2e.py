"""Tool calling end to end through a real `headrace serve` and the openai client: required and named calls
always parse into OpenAI's shape with arguments valid under each tool's schema, streamed deltas join into
exactly the non-streamed call, a history with tool calls and results renders, bad tool choices are 400s."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from headrace.services.api.tools import MAX_PARALLEL_CALLS

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": -999, "maximum": 999},
                                         "b": {"type": "integer", "minimum": -999, "maximum": 999}},
        "required": ["a", "b"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                            "maximum": 99}, "maxItems": 3}},
        "required": ["ids"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTIONS = ["What is the weather in Paris?", "Add 2 and 40.", "Look up items 3 and 7.", "Hi there!",
             "Is it raining in Oslo, in fahrenheit?", "What is 19 plus 23?"]


@pytest.fixture(scope="module")
def client(constrained_server):
    """The server of tests/headrace/conftest.py (shared with test_structured_e2e.py): auto tool choice, hermes."""
    return openai.OpenAI(base_url=constrained_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def ask(client, question: str, **kw):
    kw.setdefault("max_tokens", 80)
    kw.setdefault("tools", TOOLS)
    return client.chat.completions.create(model=MODEL, temperature=0,
                                          messages=[{"role": "user", "content": question}], **kw)


def _check_calls(calls, only: str | None = None) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        assert only is None or call.function.name == only
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("question", QUESTIONS)
def test_required_always_gives_valid_calls(client, question):
    # One call each: with parallel calls allowed this 135M model tends to repeat calls until max_tokens.
    reply = ask(client, question, tool_choice="required", parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    _check_calls(choice.message.tool_calls)


def streamed(client, question: str, **kw) -> tuple[str, str | None, list[tuple[str, str]], int]:
    """(content, finish reason, calls as (name, arguments), chunks) of a streamed reply, its deltas joined."""
    calls: dict[int, dict] = {}
    content, finish, chunks = "", None, 0
    for chunk in ask(client, question, stream=True, **kw):
        chunks += 1
        delta = chunk.choices[0].delta
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
        for part in delta.tool_calls or []:
            if part.index not in calls:  # a call's first delta: its index, id, type and whole name
                assert part.index == len(calls) and part.id and part.type == "function" and part.function.name
                calls[part.index] = {"name": part.function.name, "arguments": part.function.arguments or ""}
            else:
                assert part.id is None and not part.function.name
                calls[part.index]["arguments"] += part.function.arguments or ""
    return content, finish, [(c["name"], c["arguments"]) for c in calls.values()], chunks


def _pairs(message) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def test_parallel_required_calls_end_within_the_bound_and_stream_call_by_call(client):
    # Unbounded, this model repeats its call until max_tokens; the grammar closes the array at the bound.
    # (A tool without parameters keeps the calls short.)
    ping = [{"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}]
    kw = dict(tool_choice="required", max_tokens=200, tools=ping)
    whole = ask(client, "Ping the server a few times.", **kw).choices[0]
    assert whole.finish_reason == "tool_calls"
    assert 1 < len(whole.message.tool_calls) <= MAX_PARALLEL_CALLS
    assert all(c.function.name == "ping" and json.loads(c.function.arguments) == {} for c in whole.message.tool_calls)
    content, finish, calls, _ = streamed(client, "Ping the server a few times.", **kw)
    assert (content, finish, calls) == ("", "tool_calls", _pairs(whole.message))


def test_a_required_call_cut_short_is_left_as_text(client):
    choice = ask(client, "Add 2 and 40.", tool_choice="required", max_tokens=12).choices[0]
    assert choice.finish_reason == "length" and choice.message.content.startswith('[{"name": ')
    assert not choice.message.tool_calls


@pytest.mark.parametrize("name", [t["function"]["name"] for t in TOOLS])
def test_a_named_function_is_always_called(client, name):
    choice = ask(client, QUESTIONS[0], tool_choice={"type": "function", "function": {"name": name}}).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    _check_calls(choice.message.tool_calls, only=name)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}, "auto"])
def test_streamed_deltas_join_into_the_non_streamed_call(client, tool_choice):
    kw = {"parallel_tool_calls": False} if tool_choice == "required" else {}
    whole = ask(client, "Add 5 and 6.", tool_choice=tool_choice, **kw).choices[0]
    content, finish, calls, chunks = streamed(client, "Add 5 and 6.", tool_choice=tool_choice, **kw)
    assert finish == whole.finish_reason
    assert content == (whole.message.content or "")
    assert calls == _pairs(whole.message)
    assert chunks > len(calls) + 3  # the arguments came in pieces as they were written, not whole at the end


def test_a_history_with_tool_calls_and_results_renders(client):
    first = ask(client, "What is the weather in Paris?", tool_choice="required",
                parallel_tool_calls=False).choices[0].message
    call = first.tool_calls[0]
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call.id, "type": "function",
                     "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
                {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    reply = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=16, tools=TOOLS,
                                           messages=messages, tool_choice="none")
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls
    root = str(client.base_url).removesuffix("/").removesuffix("/v1")
    tokens = httpx.post(root + "/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]
    text = httpx.post(root + "/detokenize", json={"model": MODEL, "tokens": tokens}).json()["prompt"]
    assert '{"temperature": 21}' in text


@pytest.mark.parametrize("extra,param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "array", "uniqueItems": True}}}}}], "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools.[0]"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_requests_are_400s(client, extra, param):
    body = {"tools": TOOLS, **extra}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "x"}],
                                       extra_body=body)
    assert err.value.body["param"] == param, err.value.body
    assert ask(client, "hi", tool_choice="none").choices[0].message.content
