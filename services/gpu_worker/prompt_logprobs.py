"""Prompt logprobs (scoring requests): the logprob, rank and top-N of every prompt token after the first,
computed from the hidden states of the prefill that runs anyway.

The hidden state at position p predicts token p + 1, so a prefill chunk over positions [a, b) scores prompt
tokens a + 1 .. min(b, P - 1) (P prompt tokens; the last position predicts the first output token, which the
sampler handles). Each chunk's scores are appended to the request's `PromptScores`; the step that samples
the request's first token hands them over whole (StepResult.prompt_logprobs).

Positions served from the prefix cache have no hidden state here, so the scheduler never reads the cache
for a request that asks for prompt logprobs (block_manager.get_computed_blocks): its whole prompt runs.
A request resumed after preemption with outputs already has its prompt scores delivered and scores nothing.
The scores are read back to the host in the step that computes them, as the sampler's logprobs are: a
scoring step does not overlap with the next one on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from headrace.common.messages import PromptLogprobs

if TYPE_CHECKING:  # request_state imports this module
    from headrace.services.gpu_worker.request_state import RequestState

# Rows of logits made at once: a chunk of thousands of tokens times a 150k vocabulary would otherwise need
# gigabytes for one float32 [rows, vocab] tensor.
_ROWS_PER_SLICE = 256


class PromptScores:
    """One request's prompt logprobs as its prefill chunks produce them, in position order."""

    def __init__(self, num_top: int):
        self.num_top = num_top
        self.scores = PromptLogprobs(num_top=num_top)

    @property
    def num_scored(self) -> int:
        """Prompt tokens scored so far (tokens 1..num_scored)."""
        return len(self.scores.token_logprobs)

    def add(self, first: int, token_logprobs: list[float], ranks: list[int], top_ids: list[int],
            top_logprobs: list[float]) -> None:
        """Scores of prompt tokens first + 1 .. first + len(token_logprobs). A chunk computed again (the
        same positions twice) replaces what it covers."""
        s, k = self.scores, self.num_top
        if first < self.num_scored:
            del s.token_logprobs[first:], s.token_ranks[first:], s.top_token_ids[first * k:], s.top_logprobs[first * k:]
        assert first == self.num_scored, f"prompt scores jump from token {self.num_scored + 1} to {first + 1}"
        s.token_logprobs += token_logprobs
        s.token_ranks += ranks
        s.top_token_ids += top_ids
        s.top_logprobs += top_logprobs

    def take(self) -> PromptLogprobs:
        return self.scores


@dataclass(frozen=True)
class PromptSpan:
    """The rows of one request's chunk whose hidden states score prompt tokens."""

    scores: PromptScores
    token_ids: list[int]  # the request's tokens (prompt first)
    flat_start: int  # index in the step's flat batch of the row at `first`
    first: int  # position of the first such row
    end: int  # one past the last such position (at most P - 1)


def prompt_spans(states: list[RequestState], starts: np.ndarray, ends: np.ndarray, flat_starts: np.ndarray) -> list[PromptSpan]:
    """Spans of this step's sequences that still score prompt tokens (states, starts, ends and flat_starts
    in batch order)."""
    spans = []
    for i, st in enumerate(states):
        scores = st.prompt_scores
        if scores is None:
            continue
        a, b = int(starts[i]), min(int(ends[i]), st.num_prompt_tokens - 1)
        if a < b:
            spans.append(PromptSpan(scores, st.token_ids, int(flat_starts[i]), a, b))
    return spans


@torch.no_grad()
def score_prompt_spans(spans: list[PromptSpan], hidden: torch.Tensor,
                       compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Score every span's prompt tokens from `hidden` (the step's [T, hidden] states), a slice of rows at a
    time; float32 log-softmax over the full vocabulary, as the sampler's logprobs."""
    for span in spans:
        k = span.scores.num_top
        for a in range(span.first, span.end, _ROWS_PER_SLICE):
            b = min(a + _ROWS_PER_SLICE, span.end)
            rows = hidden[span.flat_start + a - span.first : span.flat_start + b - span.first]
            logprobs = compute_logits(rows).float().log_softmax(dim=-1)
            targets = torch.tensor(span.token_ids[a + 1 : b + 1], dtype=torch.int64, device=logprobs.device)
            own = logprobs.gather(1, targets[:, None])
            # Rank 1 is the top choice; ties with the token count in its favour, as vLLM counts them.
            ranks = (logprobs > own).sum(dim=-1).add_(1)
            top_lp, top_ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
            span.scores.add(a, own.squeeze(1).tolist(), ranks.tolist(), top_ids.reshape(-1).tolist(),
                            top_lp.reshape(-1).tolist())
