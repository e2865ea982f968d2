"""headrace: an LLM serving engine. The offline API: `from headrace import LLM, SamplingParams`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from headrace.common.sampling_params import SamplingParams

if TYPE_CHECKING:
    from headrace.llm import LLM

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":  # imported lazily: the CLI should not pay for torch when it only parses flags
        from headrace.llm import LLM

        return LLM
    raise AttributeError(name)
