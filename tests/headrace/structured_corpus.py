"""A corpus of JSON schemas for the structured-output tests: every shape of the spec the grammar engine
enforces (nested objects, bounded arrays, enums, anyOf, $ref/$defs, string patterns and formats, numeric
bounds, required subsets, additionalProperties false). Every string, array and number is bounded so a small
model's greedy output always finishes within a short max_tokens."""

from __future__ import annotations

import copy
from typing import Any

# One property each: (name, schema).
FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("name", {"type": "string", "minLength": 1, "maxLength": 12}),
    ("age", {"type": "integer", "minimum": 0, "maximum": 120}),
    ("score", {"type": "number", "minimum": -10, "maximum": 10}),
    ("active", {"type": "boolean"}),
    ("color", {"enum": ["red", "green", "blue"]}),
    ("kind", {"const": "widget"}),
    ("code", {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}),
    ("day", {"type": "string", "format": "date"}),
    ("id", {"type": "string", "format": "uuid"}),
    ("ip", {"type": "string", "format": "ipv4"}),
    ("count", {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 50}),
    ("note", {"type": ["string", "null"], "maxLength": 8}),
    ("level", {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 5}, {"enum": ["low", "high"]}]}),
    ("tags", {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3}),
    ("at", {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}),  # format "time": unbounded fractions
    ("pair", {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                {"type": "boolean"}], "items": False}),
]


def _object(fields: list[tuple[str, dict[str, Any]]], required: list[str] | None = None,
            closed: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": {n: copy.deepcopy(s) for n, s in fields},
                              "required": [n for n, _ in fields] if required is None else required}
    if closed:
        schema["additionalProperties"] = False
    return schema


def _pick(i: int, k: int) -> list[tuple[str, dict[str, Any]]]:
    """k distinct fields, rotating through FIELDS from position i."""
    return [FIELDS[(i + 3 * j) % len(FIELDS)] for j in range(k)]


def _wrap(variant: int, i: int) -> dict[str, Any]:
    fields = _pick(i, 2 + i % 3)
    names = [n for n, _ in fields]
    if variant == 0:  # flat, everything required
        return _object(fields)
    if variant == 1:  # a required subset, closed
        return _object(fields, required=names[:1], closed=True)
    if variant == 2:  # nested object two levels down
        inner = _object(fields[1:], closed=True)
        return _object([fields[0], ("detail", {"type": "object", "properties": {"inner": inner},
                                                "required": ["inner"], "additionalProperties": False})])
    if variant == 3:  # bounded array of objects
        return _object([("items", {"type": "array", "items": _object(fields[:2], closed=True),
                                   "minItems": 1, "maxItems": 2})])
    if variant == 4:  # $ref / $defs
        return {"$defs": {"thing": _object(fields, closed=True)}, "type": "object",
                "properties": {"first": {"$ref": "#/$defs/thing"}, "ok": {"type": "boolean"}},
                "required": ["first", "ok"], "additionalProperties": False}
    if variant == 5:  # anyOf between two object shapes
        return {"anyOf": [_object(fields[:1], closed=True), _object(fields[1:], closed=True)]}
    if variant == 6:  # the top level is an array
        return {"type": "array", "items": fields[0][1], "minItems": 1, "maxItems": 3}
    return _object(fields, required=[], closed=True)  # nothing required


def schemas(count: int = 104) -> list[dict[str, Any]]:
    return [_wrap(i % 8, i // 8 + i) for i in range(count)]
