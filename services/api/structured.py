"""Which constraint a request puts on its output, from however the client spelt it: OpenAI's
`response_format`, vLLM's `structured_outputs` object, or vLLM's older `guided_json` / `guided_regex` /
`guided_choice` / `guided_grammar`. The shape of the request is checked here; whether the schema, regex or
grammar itself is valid and enforceable is the tokenizer's call (services/tokenizer/grammar.py), which answers
with a 400 naming the same field.
"""

from __future__ import annotations

import json
from typing import Any

from headrace.common.messages import GrammarSpec
from headrace.services.api.errors import ApiError
from headrace.services.api.protocol import SamplingBody

# structured_outputs' keys, and the GrammarSpec kind each one means.
_STRUCTURED_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
_GUIDED_FIELDS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}


def grammar_spec(body: SamplingBody) -> GrammarSpec | None:
    """The request's one output constraint, or None. Two of them at once is a 400 naming the second."""
    specs = [spec for spec in (_response_format(body.response_format), _structured_outputs(body.structured_outputs),
                               *_guided(body)) if spec is not None]
    if len(specs) > 1:
        raise ApiError(400, f"'{specs[1].param}' and '{specs[0].param}' both constrain the output; send one.",
                       param=specs[1].param)
    return specs[0] if specs else None


def _response_format(value: dict[str, Any] | None) -> GrammarSpec | None:
    param = "response_format"
    if value is None:
        return None
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", "", param)
    if kind != "json_schema":
        raise ApiError(400, f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}.",
                       param="response_format.type")
    inner = value.get("json_schema")
    if not isinstance(inner, dict) or not isinstance(inner.get("name"), str):
        raise ApiError(400, "response_format of type 'json_schema' needs a 'json_schema' object with a 'name'.",
                       param="response_format.json_schema")
    schema = inner.get("schema")
    if schema is None:  # OpenAI allows a named format without a schema: any JSON object then
        return GrammarSpec("json_object", "", param)
    return GrammarSpec("json_schema", _schema_text(schema, "response_format.json_schema.schema"), param)


def _structured_outputs(value: dict[str, Any] | None) -> GrammarSpec | None:
    if not value:
        return None
    given = [key for key, v in value.items() if v is not None]
    unknown = [key for key in given if key not in _STRUCTURED_KINDS]
    if unknown:
        raise ApiError(400, f"structured_outputs.{unknown[0]} is not supported; use one of "
                            f"{', '.join(_STRUCTURED_KINDS)}.", param=f"structured_outputs.{unknown[0]}")
    if len(given) != 1:
        raise ApiError(400, "structured_outputs needs exactly one of json, regex, choice, grammar.",
                       param="structured_outputs")
    key = given[0]
    return _spec(_STRUCTURED_KINDS[key], value[key], f"structured_outputs.{key}")


def _guided(body: SamplingBody) -> list[GrammarSpec | None]:
    return [None if getattr(body, name) is None else _spec(kind, getattr(body, name), name)
            for name, kind in _GUIDED_FIELDS.items()]


def _spec(kind: str, value: Any, param: str) -> GrammarSpec:
    if kind == "json_schema":
        return GrammarSpec(kind, _schema_text(value, param), param)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise ApiError(400, f"{param} must be a non-empty list of non-empty strings.", param=param)
        return GrammarSpec(kind, json.dumps(value), param)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{param} must be a non-empty string.", param=param)
    return GrammarSpec(kind, value, param)


def _schema_text(schema: Any, param: str) -> str:
    """A schema given as an object or as JSON text (vLLM accepts both), as JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise ApiError(400, f"{param} is not valid JSON.", param=param) from None
    if not isinstance(schema, (dict, bool)):
        raise ApiError(400, f"{param} must be a JSON schema object.", param=param)
    return json.dumps(schema)
