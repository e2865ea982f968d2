"""A constrained request's `GrammarSpec` -> one checked EBNF grammar (xgrammar's dialect), cached.

Everything that can be wrong with a grammar is found here, in the tokenizer, so it is a 400 naming the field
before the engine sees the request: a schema that is not valid JSON Schema, a keyword xgrammar would
silently skip (the output would then not be what the schema asks), a regex or EBNF that does not parse.

What leaves for the engine is the EBNF text, not xgrammar's compiled token automaton. Measured on this
project's CPU with the embedded 49k-token vocabulary: deserializing a compiled grammar costs 2-27 ms, no
less than compiling its EBNF against the vocabulary (8-12 ms), and its serialized form is 18-740 KB per
request per worker rank against a few KB of EBNF. So the worker compiles the EBNF itself, cached by text,
on a background thread (xgrammar releases the GIL) that overlaps the request's prefill.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from headrace.common.messages import GrammarSpec
from headrace.services.tokenizer.errors import RequestError

# JSON Schema keywords xgrammar accepts but does not enforce (probed on xgrammar 0.2.9: the grammar it builds
# is the same with or without them), and `oneOf` / `allOf`, which it only approximates. Such a schema is
# refused rather than answered with output that may not validate.
UNSUPPORTED_KEYWORDS = frozenset({
    "allOf", "oneOf", "not", "if", "then", "else", "uniqueItems", "contains", "minContains", "maxContains",
    "propertyNames", "dependentRequired", "dependentSchemas", "dependencies", "unevaluatedProperties",
    "unevaluatedItems", "$dynamicRef", "$recursiveRef",
})
# Keywords whose values are maps of name -> subschema, and lists of subschemas.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties")

# JSON keeps to one compact line: any-whitespace grammars let a small model spin on spaces until max_tokens.
_COMPACT = {"any_whitespace": False, "strict_mode": True}


class GrammarBuilder:
    """Turns specs into EBNF, remembering the last `capacity` distinct ones (a burst of one schema costs one
    conversion)."""

    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, str], str] = OrderedDict()

    @staticmethod
    def warm_up() -> None:
        """Import xgrammar (it brings torch: seconds) and jsonschema before serving: done lazily, the first
        constrained request would hold this tokenizer's loop past its heartbeat deadline."""
        to_ebnf(GrammarSpec("json_schema", '{"type": "object", "properties": {"a": {"type": "integer"}}}'))

    def build(self, spec: GrammarSpec) -> str:
        key = (spec.kind, spec.source)
        ebnf = self._cache.get(key)
        if ebnf is None:
            ebnf = to_ebnf(spec)
            self._cache[key] = ebnf
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return ebnf


def to_ebnf(spec: GrammarSpec) -> str:
    import xgrammar as xgr  # heavy: only processes that build grammars load it

    param = spec.param or None
    if spec.kind == "json_schema":
        schema = check_schema(spec.source, param)
        return _converted(lambda: xgr.Grammar.from_json_schema(json.dumps(schema), **_COMPACT), "schema", param)
    if spec.kind == "json_object":
        # Not strict: strict mode closes objects without `properties` to {}, and any object is wanted here.
        return _converted(lambda: xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False,
                                                               strict_mode=False), "schema", param)
    if spec.kind == "regex":
        return _converted(lambda: xgr.Grammar.from_regex(spec.source), "regex", param)
    if spec.kind == "choice":
        return choice_ebnf(spec.source, param)
    if spec.kind == "grammar":
        return _converted(lambda: xgr.Grammar.from_ebnf(spec.source), "grammar", param)
    raise RequestError(f"unknown structured output kind {spec.kind!r}.", param)


def _converted(make: Any, what: str, param: str | None) -> str:
    try:
        return str(make())
    except Exception as e:  # xgrammar raises RuntimeError / ValueError with the parser's message
        raise RequestError(f"invalid {what}: {_first_line(e)}", param) from None


def _first_line(e: Exception) -> str:
    """xgrammar prefixes its messages with a timestamp and source location: keep the reason."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text


def check_schema(source: str, param: str | None) -> Any:
    """The schema parsed, valid JSON Schema, and using only keywords the grammar enforces."""
    import jsonschema

    try:
        schema = json.loads(source)
    except ValueError as e:
        raise RequestError(f"the schema is not JSON: {e}", param) from None
    if not isinstance(schema, (dict, bool)):
        raise RequestError("a JSON schema must be an object.", param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path) or "the root"
        raise RequestError(f"invalid JSON schema at {where}: {e.message}", param) from None
    _check_keywords(schema, "#", param)
    return schema


def _check_keywords(schema: Any, where: str, param: str | None) -> None:
    if not isinstance(schema, dict):
        return
    bad = sorted(UNSUPPORTED_KEYWORDS.intersection(schema))
    if bad:
        raise RequestError(f"JSON schema keyword '{bad[0]}' (at {where}) cannot be enforced by this server's "
                           "grammar engine; remove it or express it another way.", param)
    if "multipleOf" in schema and schema.get("type") != "integer":
        raise RequestError(f"JSON schema keyword 'multipleOf' (at {where}) is enforced on integers only.", param)
    for key in _SCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items():
            _check_keywords(sub, f"{where}/{key}/{name}", param)
    for key in _SCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or []):
            _check_keywords(sub, f"{where}/{key}/{i}", param)
    for key in _SCHEMA_VALUES:
        _check_keywords(schema.get(key), f"{where}/{key}", param)


def choice_ebnf(source: str, param: str | None) -> str:
    """One of the listed strings, exactly: each alternative a quoted EBNF literal."""
    try:
        choices = json.loads(source)
    except ValueError:
        choices = None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise RequestError("a choice must be a non-empty list of non-empty strings.", param)
    return "root ::= " + " | ".join(json.dumps(c) for c in choices) + "\n"
