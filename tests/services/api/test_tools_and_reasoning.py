"""Tool-call parsers, tool plans and the reasoning split, and how a chat reply carries them (whole and
streamed: joined, the stream's deltas must give exactly the whole message)."""

from __future__ import annotations

import json

import pytest

from headrace.common.messages import TextDelta
from headrace.services.api.errors import ApiError
from headrace.services.api.reasoning import split_reasoning
from headrace.services.api.responses import ChatShape, ChoiceState
from headrace.services.api.tools import parse_tool_calls, tool_plan

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}},
         {"type": "function", "function": {"name": "now"}}]


def _calls(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("parser,text,content,calls", [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
               '<tool_call>{"name": "now", "arguments": {}}</tool_call>', "Sure.", [("add", {"a": 1, "b": 2}),
                                                                                   ("now", {})]),
    ("hermes", "no calls here", "no calls here", []),
    ("hermes", '<tool_call>{"name": "add", "arguments": {"a": </tool_call>', None, []),  # broken: stays text
    ("llama3_json", '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "now", '
                    '"parameters": {}}', None, [("add", {"a": 1, "b": 2}), ("now", {})]),
    ("llama3_json", "The answer is 3.", "The answer is 3.", []),
    ("mistral", 'ok [TOOL_CALLS][{"name": "add", "arguments": {"a": 5, "b": 6}}]', "ok", [("add", {"a": 5, "b": 6})]),
])
def test_parsers(parser, text, content, calls):
    got_content, got_calls = parse_tool_calls(parser, text)
    assert _calls(got_calls) == calls
    assert got_content == (text if not calls else content)


def test_plans_and_their_grammars():
    assert tool_plan(TOOLS, "none", None, True, "hermes") is None
    assert tool_plan(TOOLS, None, None, False, None) is None  # auto is off: plain text, as vLLM
    assert tool_plan(TOOLS, None, None, True, "hermes").mode == "auto"
    required = tool_plan(TOOLS, "required", False, False, None)
    schema = json.loads(required.grammar().source)
    assert schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    named = tool_plan(TOOLS, {"type": "function", "function": {"name": "add"}}, None, False, None)
    assert json.loads(named.grammar().source) == TOOLS[0]["function"]["parameters"]
    assert _calls(named.extract('{"a": 1, "b": 2}')[1]) == [("add", {"a": 1, "b": 2})]
    assert _calls(required.extract('[{"name": "now", "arguments": {}}]')[1]) == [("now", {})]
    # auto ignores calls to functions the request did not offer
    auto = tool_plan(TOOLS, "auto", None, True, "hermes")
    assert auto.extract('<tool_call>{"name": "rm", "arguments": {}}</tool_call>')[1] == []


@pytest.mark.parametrize("tools,choice,param", [
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    (TOOLS, "auto", "tool_choice"),  # the server was not started with --enable-auto-tool-choice
    (TOOLS, "sometimes", "tool_choice"),
    (None, "required", "tool_choice"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "required", "tools.[0].function.parameters"),
])
def test_bad_plans_are_400s(tools, choice, param):
    with pytest.raises(ApiError) as err:
        tool_plan(tools, choice, None, False, None)
    assert err.value.status == 400 and err.value.param == param


@pytest.mark.parametrize("parser,text,final,want", [
    ("qwen3", "<think>plan</think>\n\nanswer", True, ("plan", "answer")),
    ("qwen3", "just an answer", True, ("", "just an answer")),
    ("qwen3", "<thi", False, ("", "")),  # maybe a tag: held back
    ("deepseek_r1", "plan</think>answer", True, ("plan", "answer")),
    ("deepseek_r1", "still thinking</th", False, ("still thinking", "")),
    ("deepseek_r1", "never closed", True, ("never closed", "")),
])
def test_reasoning_split(parser, text, final, want):
    assert split_reasoning(parser, text, final) == want


def _stream_and_whole(shape: ChatShape, pieces: list[str]):
    state = ChoiceState(0)
    chunks = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        delta = TextDelta("r", piece, [i], finished=last, finish_reason="stop" if last else None,
                          num_output_tokens=i + 1)
        text = state.add(delta)
        chunks += shape.delta_chunks(state, text, delta)
    joined: dict = {"content": "", "reasoning_content": "", "calls": {}}
    finish = None
    for chunk in chunks:
        choice = chunk["choices"][0]
        finish = choice["finish_reason"] or finish
        d = choice["delta"]
        joined["content"] += d.get("content") or ""
        joined["reasoning_content"] += d.get("reasoning_content") or ""
        for part in d.get("tool_calls") or []:
            call = joined["calls"].setdefault(part["index"], ["", ""])
            call[0] += part.get("function", {}).get("name", "")
            call[1] += part.get("function", {}).get("arguments", "")
    return joined, finish, shape._choice(state)


def test_streamed_reasoning_and_calls_join_into_the_whole_message():
    shape = ChatShape("id", 0, "m", logprobs=False, include_usage=False, reasoning_parser="qwen3",
                      tools=tool_plan(TOOLS, "auto", None, True, "hermes"))
    pieces = ["<th", "ink>add th", "em</th", "ink>\n\nOk ", '<tool_call>{"name": "add", ',
              '"arguments": {"a": 1, "b": 2}}</tool_call>']
    joined, finish, whole = _stream_and_whole(shape, pieces)
    message = whole["message"]
    assert message["reasoning_content"] == joined["reasoning_content"] == "add them"
    assert message["content"] == joined["content"] == "Ok"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == \
        [tuple(c) for c in joined["calls"].values()]
    assert finish == whole["finish_reason"] == "tool_calls"


def test_streamed_reasoning_alone_is_incremental():
    shape = ChatShape("id", 0, "m", logprobs=False, include_usage=False, reasoning_parser="deepseek_r1")
    joined, finish, whole = _stream_and_whole(shape, ["a b", " c</th", "ink>", "\nanswer", " done"])
    assert (joined["reasoning_content"], joined["content"]) == ("a b c", "answer done")
    assert whole["message"]["reasoning_content"] == "a b c" and whole["message"]["content"] == "answer done"
    assert finish == "stop"


_STREAMED = [  # (mode or parser, reply, the calls it holds)
    ("hermes", 'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
               '<tool_call>{"name": "now", "arguments": {}}</tool_call>', 2),
    ("hermes", '<tool_call>{"arguments": {"b": "x\\"}y"}, "name": "add"}</tool_call>', 1),  # name last
    ("hermes", "Just text, and a < sign.  ", 0),
    ("llama3_json", '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": [2, {"c": "]"}]}}; '
                    '{"name": "now", "parameters": {}}', 2),
    ("llama3_json", "The answer is {3}.", 0),
    ("mistral", 'ok [TOOL_CALLS][{"name": "add", "arguments": {"a": 5, "b": 6}}, {"name": "now", '
                '"arguments": "{\\"x\\": 1}"}]', 2),
    ("required", '[{"name": "add", "arguments": {"a": 1, "b": -2}}, {"name": "now", "arguments": {}}]', 2),
    ("named", '{"a": 1, "b": "caf\\u00e9"}', 1),
]


def _plan(kind: str):
    if kind == "required":
        return tool_plan(TOOLS, "required", None, False, None)
    if kind == "named":
        return tool_plan(TOOLS, {"type": "function", "function": {"name": "add"}}, None, False, None)
    return tool_plan(TOOLS, "auto", None, True, kind)


@pytest.mark.parametrize("kind,text,num_calls", _STREAMED)
@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_streamed_calls_join_into_exactly_the_whole_calls(kind, text, num_calls, piece):
    shape = ChatShape("id", 0, "m", logprobs=False, include_usage=False, tools=_plan(kind))
    joined, finish, whole = _stream_and_whole(shape, [text[i:i + piece] for i in range(0, len(text), piece)])
    message = whole["message"]
    assert len(message["tool_calls"]) == num_calls
    assert joined["content"] == (message["content"] or "")
    assert [tuple(c) for c in joined["calls"].values()] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
    assert finish == whole["finish_reason"] == ("tool_calls" if num_calls else "stop")
    for call in message["tool_calls"]:  # the model's own text, parsed only to check it
        assert isinstance(json.loads(call["function"]["arguments"]), dict)


def test_a_call_streams_its_name_first_then_pieces_of_its_arguments():
    shape = ChatShape("id", 0, "m", logprobs=False, include_usage=False, tools=_plan("required"))
    state, parts = ChoiceState(0), []
    text = '[{"name": "add", "arguments": {"a": 12, "b": 3}}, {"name": "now", "arguments": {}}]'
    for i in range(0, len(text), 4):
        last = i + 4 >= len(text)
        delta = TextDelta("r", text[i:i + 4], [i], finished=last, finish_reason="stop" if last else None)
        state.add(delta)
        parts += [p for c in shape.delta_chunks(state, "", delta) for p in c["choices"][0]["delta"].get(
            "tool_calls") or []]
    first, second = parts[0], next(p for p in parts if p["index"] == 1)
    assert first["type"] == "function" and first["id"] and first["function"] == {"name": "add", "arguments": ""}
    assert second["id"] != first["id"] and second["function"]["name"] == "now"
    pieces = [p["function"]["arguments"] for p in parts if p["index"] == 0 and "id" not in p]
    assert len(pieces) > 3 and "".join(pieces) == '{"a": 12, "b": 3}'  # written as generated, not at the end


def test_a_forced_call_cut_short_is_text_whole_and_partial_streamed():
    shape = ChatShape("id", 0, "m", logprobs=False, include_usage=False, tools=_plan("required"))
    state = ChoiceState(0)
    delta = TextDelta("r", '[{"name": "add", "arguments": {"a": 1', [1], finished=True, finish_reason="length")
    state.add(delta)
    assert shape._choice(state)["message"]["tool_calls"] == []
    assert shape._choice(state)["message"]["content"].startswith('[{"name": "add"')
