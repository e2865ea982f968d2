"""The tokenizer's side of structured outputs: every kind of spec becomes EBNF that xgrammar parses, and
whatever cannot be enforced is a RequestError naming the field, never a grammar that skips it."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr

from headrace.common.messages import GrammarSpec
from headrace.services.tokenizer.errors import RequestError
from headrace.services.tokenizer.grammar import GrammarBuilder, to_ebnf


@pytest.mark.parametrize("spec", [
    GrammarSpec("json_schema", json.dumps({"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}},
                                           "$defs": {"x": {"type": "integer", "multipleOf": 3}}})),
    GrammarSpec("json_object", ""),
    GrammarSpec("regex", r"\d{3}-[a-z]+"),
    GrammarSpec("choice", json.dumps(["yes", 'a "quoted" one', "é\n"])),
    GrammarSpec("grammar", 'root ::= "a" rest\nrest ::= [0-9]+'),
])
def test_every_kind_becomes_ebnf_xgrammar_reads(spec):
    xgr.Grammar.from_ebnf(to_ebnf(spec))


def test_choice_escapes_its_strings():
    ebnf = to_ebnf(GrammarSpec("choice", json.dumps(['say "hi"', "back\\slash"])))
    assert str(xgr.Grammar.from_ebnf(ebnf)).count("|") == 1


@pytest.mark.parametrize("spec,says", [
    (GrammarSpec("json_schema", "{not json", "guided_json"), "not JSON"),
    (GrammarSpec("json_schema", '{"type": "strin"}', "guided_json"), "invalid JSON schema"),
    (GrammarSpec("json_schema", '{"type": "integer", "minimum": "1"}', "guided_json"), "invalid JSON schema"),
    (GrammarSpec("json_schema", '{"type": "array", "uniqueItems": true}', "guided_json"), "'uniqueItems'"),
    (GrammarSpec("json_schema", '{"properties": {"a": {"items": {"not": {}}}}}', "guided_json"), "#/properties/a/items"),
    (GrammarSpec("json_schema", '{"anyOf": [{"if": {}}]}', "guided_json"), "'if'"),
    (GrammarSpec("json_schema", '{"type": "number", "multipleOf": 0.5}', "guided_json"), "integers only"),
    (GrammarSpec("json_schema", '{"oneOf": [{"type": "string"}, {"type": "integer"}]}', "guided_json"), "'oneOf'"),
    (GrammarSpec("regex", "(unclosed", "guided_regex"), "invalid regex"),
    (GrammarSpec("grammar", "root ::= undefined_rule", "guided_grammar"), "invalid grammar"),
    (GrammarSpec("choice", "[]", "guided_choice"), "non-empty"),
])
def test_what_cannot_be_enforced_is_a_request_error_naming_the_field(spec, says):
    with pytest.raises(RequestError) as err:
        to_ebnf(spec)
    assert says in str(err.value) and err.value.param == spec.param and err.value.code == 400


def test_the_builder_caches_by_spec():
    builder = GrammarBuilder(capacity=2)
    specs = [GrammarSpec("regex", f"a{i}") for i in range(3)]
    first = builder.build(specs[0])
    assert builder.build(specs[0]) is first  # from the cache
    builder.build(specs[1])
    builder.build(specs[2])  # evicts the least recently used
    assert len(builder._cache) == 2 and ("regex", "a0") not in builder._cache
