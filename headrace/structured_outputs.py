"""Structured outputs for the offline API: vLLM's `StructuredOutputsParams` in headrace's terms.

vLLM hangs them on `SamplingParams(structured_outputs=...)`; here they are their own argument of
`LLM.generate` / `LLM.chat` / `LLM.submit` (SamplingParams crosses the wire to the engine, a grammar does not
travel in it). They are checked and converted to EBNF by the same code the served tokenizer runs
(services/tokenizer/grammar.py), so a schema the server refuses raises the same message here (a ValueError),
and an offline request gets exactly the grammar, hence the greedy tokens, the server gives it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from headrace.common.messages import GrammarSpec
from headrace.services.tokenizer.grammar import GrammarBuilder


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one constraint on a request's output:

        json:        a JSON schema (a dict, or its JSON text)
        regex:       a regular expression the whole output matches
        choice:      the output is one of these strings
        grammar:     an EBNF / GBNF grammar (xgrammar's dialect)
        json_object: any JSON object
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def spec(self) -> GrammarSpec:
        """The constraint as the engine's tokenizer takes it; ValueError unless exactly one is given."""
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"StructuredOutputs needs exactly one of json, regex, choice, grammar, json_object; "
                             f"got {', '.join(given) or 'none'}")
        name = given[0]
        if name == "json":
            source = self.json if isinstance(self.json, str) else json.dumps(self.json)
            return GrammarSpec("json_schema", source, "structured_outputs.json")
        if name == "choice":
            return GrammarSpec("choice", json.dumps(list(self.choice or [])), "structured_outputs.choice")
        if name == "json_object":
            return GrammarSpec("json_object", "", "structured_outputs.json_object")
        return GrammarSpec(name, getattr(self, name), f"structured_outputs.{name}")


class GrammarCache:
    """StructuredOutputs -> checked EBNF, remembered like the tokenizer's (one conversion per schema)."""

    def __init__(self) -> None:
        self._builder = GrammarBuilder()

    def ebnf(self, constraint: StructuredOutputs | None) -> str | None:
        return None if constraint is None else self._builder.build(constraint.spec())

    def per_prompt(self, constraints: StructuredOutputs | Sequence[StructuredOutputs | None] | None,
                   n: int) -> list[str | None]:
        """One EBNF (or None) per prompt: one constraint for all, or one each."""
        if constraints is None or isinstance(constraints, StructuredOutputs):
            return [self.ebnf(constraints)] * n
        listed = list(constraints)
        if len(listed) != n:
            raise ValueError(f"{len(listed)} structured outputs for {n} prompts")
        return [self.ebnf(c) for c in listed]
