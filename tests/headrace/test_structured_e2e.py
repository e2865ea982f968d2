"""Structured outputs end to end: a real `headrace serve` with the embedded model, driven by the openai client.
Every constrained output must parse and validate; constrained and unconstrained requests batched together
must each produce what they produce alone (greedy); bad constraints are 400s that leave the server serving."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest

from tests.headrace.structured_corpus import schemas

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
REGEXES = [r"\d{3}-\d{4}", r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)", r"(yes|no), because [a-z ]{1,20}\.",
           r"#[0-9a-f]{6}", r"[A-Z][a-z]{1,8} [A-Z][a-z]{1,8}", r"(\+|-)?[1-9][0-9]{0,3}\.[0-9]{2}"]
CHOICES = [["Paris", "London", "Berlin"], ["positive", "negative", "neutral"], ["A", "B", "C", "D"]]


@pytest.fixture(scope="module")
def server(constrained_server):
    return constrained_server  # tests/headrace/conftest.py: shared with test_tools_e2e.py


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _aclient(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


async def _chat(aclient, content: str, max_tokens: int, **extra) -> tuple[str, str]:
    reply = await aclient.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=max_tokens, messages=[{"role": "user", "content": content}],
        **extra)
    return reply.choices[0].message.content, reply.choices[0].finish_reason


async def _complete(aclient, prompt: str, max_tokens: int, **extra) -> tuple[str, str]:
    reply = await aclient.completions.create(model=MODEL, temperature=0, max_tokens=max_tokens, prompt=prompt,
                                             **extra)
    return reply.choices[0].text, reply.choices[0].finish_reason


def _schema_request(aclient, i: int, schema: dict):
    """Each schema through one of the four spellings, chat and completions alike."""
    prompt = f"Give example {i} as JSON."
    if i % 4 == 0:
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
        return _chat(aclient, prompt, 160, response_format=fmt)
    if i % 4 == 1:
        return _complete(aclient, prompt, 160, extra_body={"guided_json": schema})
    if i % 4 == 2:
        return _chat(aclient, prompt, 160, extra_body={"structured_outputs": {"json": schema}})
    return _complete(aclient, prompt, 160, extra_body={"guided_json": json.dumps(schema)})


def test_every_schema_of_the_corpus_gives_valid_json(server):
    corpus = schemas()
    assert len(corpus) >= 100

    async def run():
        async with _aclient(server) as aclient:
            return await asyncio.gather(*(_schema_request(aclient, i, s) for i, s in enumerate(corpus)))

    for i, ((text, finish), schema) in enumerate(zip(asyncio.run(run()), corpus)):
        assert finish == "stop", f"schema {i} ran out of tokens: {text!r}"
        jsonschema.validate(json.loads(text), schema)


def test_regex_choice_and_json_object_outputs_match(server):
    async def run():
        async with _aclient(server) as aclient:
            jobs = [_complete(aclient, f"Example {i}:", 40, extra_body={"guided_regex": r})
                    for i, r in enumerate(REGEXES)]
            jobs += [_chat(aclient, "Pick one.", 10, extra_body={"guided_choice": c}) for c in CHOICES]
            jobs += [_chat(aclient, "A JSON object of a book, please.", 120, response_format={"type": "json_object"}),
                     _complete(aclient, "Digits:", 12, extra_body={"structured_outputs": {"regex": r"[0-9]{4}"}}),
                     _complete(aclient, "Say:", 12, extra_body={"guided_grammar": 'root ::= "a" ("b" | "c")+ "d"'})]
            return await asyncio.gather(*jobs)

    got = asyncio.run(run())
    for (text, _), regex in zip(got, REGEXES):
        assert re.fullmatch(regex, text), (regex, text)
    for (text, finish), choice in zip(got[len(REGEXES):], CHOICES):
        assert text in choice and finish == "stop"
    book, digits, grammar = got[-3:]
    # Any JSON object has no length bound: it parses whenever it ends before max_tokens.
    assert isinstance(json.loads(book[0]), dict) if book[1] == "stop" else book[0].startswith("{")
    assert re.fullmatch(r"[0-9]{4}", digits[0])
    assert re.fullmatch(r"a[bc]+d", grammar[0]) or grammar[1] == "length"


def test_32_mixed_concurrent_requests_each_equal_their_run_alone(server):
    corpus = schemas()

    def request(aclient, i: int):
        if i % 3 == 0:
            return _chat(aclient, f"Tell me one fact about the number {i}.", 12)
        if i % 3 == 1:
            return _chat(aclient, "Give it as JSON.", 16,
                         response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": corpus[i]}})
        return _complete(aclient, f"Item {i}:", 12, extra_body={"guided_regex": REGEXES[i % len(REGEXES)]})

    async def together():
        async with _aclient(server) as aclient:
            return await asyncio.gather(*(request(aclient, i) for i in range(32)))

    async def alone():
        async with _aclient(server) as aclient:
            return [await request(aclient, i) for i in range(32)]

    assert asyncio.run(together()) == asyncio.run(alone())


def test_a_streamed_constrained_reply_equals_the_whole_one(client):
    schema = schemas()[8]
    kw = dict(model=MODEL, temperature=0, max_tokens=80, messages=[{"role": "user", "content": "JSON please"}],
              response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(whole), schema)


@pytest.mark.parametrize("extra,param,says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format", "invalid JSON schema"),
    ({"guided_json": {"type": "array", "uniqueItems": True}}, "guided_json", "uniqueItems"),
    ({"structured_outputs": {"json": {"type": "object", "properties": {"a": {"not": {"type": "null"}}}}}},
     "structured_outputs.json", "'not'"),
    ({"guided_regex": "(ab"}, "guided_regex", "invalid regex"),
    ({"guided_grammar": "root ::= missing_rule"}, "guided_grammar", "invalid grammar"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "both constrain"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
])
def test_bad_constraints_are_400s_naming_the_field(client, extra, param, says):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, max_tokens=4, stream=stream,
                                           messages=[{"role": "user", "content": "x"}], extra_body=extra)
        assert err.value.status_code == 400
        assert err.value.body["param"] == param and says in err.value.body["message"], err.value.body
    # ...and the server keeps serving.
    assert client.chat.completions.create(model=MODEL, max_tokens=2,
                                          messages=[{"role": "user", "content": "hi"}]).choices


# --------------------------------------------------------------------------- offline (headrace.LLM)


@pytest.fixture(scope="module")
def llm():
    from headrace import LLM

    return LLM(max_model_len=2048, device="cpu", dtype="float32", log=lambda *_: None)  # the server's


def test_offline_structured_outputs_validate_and_match(llm):
    from headrace import SamplingParams, StructuredOutputs

    corpus = schemas()[:3]
    constraints = [StructuredOutputs(json=s) for s in corpus]
    constraints += [StructuredOutputs(regex=REGEXES[0]), StructuredOutputs(choice=CHOICES[0])]
    prompts = [f"Give example {i} as JSON." for i in range(len(corpus))] + ["Phone:", "Capital?"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=120), use_tqdm=False,
                        structured_outputs=constraints)
    for out, schema in zip(outs, corpus):
        assert out.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.outputs[0].text), schema)
    assert re.fullmatch(REGEXES[0], outs[-2].outputs[0].text)
    assert outs[-1].outputs[0].text in CHOICES[0]


def test_offline_equals_served_for_the_same_greedy_request(llm, client):
    from headrace import SamplingParams, StructuredOutputs

    schema = schemas()[9]
    messages = [{"role": "user", "content": "One record as JSON, please."}]
    served = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=100, messages=messages,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}).choices[0]
    offline = llm.chat(messages, SamplingParams(temperature=0, max_tokens=100), use_tqdm=False,
                       structured_outputs=StructuredOutputs(json=schema))[0].outputs[0]
    assert offline.text == served.message.content and offline.finish_reason == served.finish_reason
    jsonschema.validate(json.loads(offline.text), schema)


@pytest.mark.parametrize("constraint,says", [
    ({"json": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
    ({"regex": "(ab"}, "invalid regex"),
    ({"regex": "a", "choice": ["a"]}, "exactly one"),
    ({}, "exactly one"),
])
def test_offline_bad_constraints_raise_before_anything_runs(llm, constraint, says):
    from headrace import SamplingParams, StructuredOutputs

    with pytest.raises(ValueError, match=re.escape(says)):
        llm.generate(["x"], SamplingParams(max_tokens=2), use_tqdm=False,
                     structured_outputs=StructuredOutputs(**constraint))
    assert not llm.engine.has_unfinished_requests()


def test_offline_a_grammar_that_does_not_compile_fails_its_prompt_alone(llm, monkeypatch):
    from headrace import SamplingParams, StructuredOutputs

    grammars = llm.engine.runner.grammars
    compile_grammar = grammars.compile
    bad = llm._grammars.ebnf(StructuredOutputs(regex="[0-9]{7}"))

    def compile_or_fail(ebnf):  # injected where xgrammar compiles: nothing the checks let through fails there
        if ebnf == bad:
            raise RuntimeError("too many states")
        return compile_grammar(ebnf)

    monkeypatch.setattr(grammars, "compile", compile_or_fail)
    outs = llm.generate(["a", "b", "c"], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False,
                        structured_outputs=[StructuredOutputs(regex="[0-9]{7}"), StructuredOutputs(regex="[a-z]{4}"),
                                            None])
    failed, constrained, free = (o.outputs[0] for o in outs)
    assert failed.finish_reason == "error" and "too many states" in failed.error and not failed.token_ids
    assert re.fullmatch("[a-z]{4}", constrained.text) and free.finish_reason == "length"
