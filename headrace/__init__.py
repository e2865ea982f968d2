"""headrace: an LLM serving engine. The offline API: `from headrace import LLM, SamplingParams`
(and `StructuredOutputs` for constrained output)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from headrace.common.sampling_params import SamplingParams

if TYPE_CHECKING:
    from headrace.llm import LLM
    from headrace.structured_outputs import StructuredOutputs

__all__ = ["LLM", "SamplingParams", "StructuredOutputs"]


def __getattr__(name: str):
    if name == "LLM":  # imported lazily: the CLI should not pay for torch when it only parses flags
        from headrace.llm import LLM

        return LLM
    if name == "StructuredOutputs":
        from headrace.structured_outputs import StructuredOutputs

        return StructuredOutputs
    raise AttributeError(name)
