"""Speculative decoding on the scheduler's side: which requests get draft tokens this step, the n-gram
(prompt lookup) proposer that makes them, and the counters of what was drafted and accepted.

Proposals are made here, not on the worker: the scheduler already holds every request's token ids and
learns which drafts were accepted from each StepResult, so the drafts simply travel in the StepPlan
(`spec_token_ids`) and the worker only verifies them. The worker's verification (rejection sampling,
services/gpu_worker/rejection_sampler.py) returns how many drafts passed; Scheduler.update_from_output
appends those and the bonus token, and rolls the rejected ones' KV back.

A request with drafts needs its newest token on the host to propose the next ones, so a request that may
draft is not planned again while a step of its own is in flight (what vLLM did first): under async
scheduling such requests step synchronously; everyone else keeps overlapping.

With a draft model (method "draft_model") the tokens are not known here: the plan only says how many drafts a
request verifies (StepPlan.num_draft_tokens, room for them allocated as for n-gram drafts), the worker's draft
model proposes them at the start of that very step, and the result names them (StepResult.draft_token_ids).
Proposing in the step itself, rather than after the previous one, means the draft writes its KV into blocks
this plan has already allocated, and it drafts from the newest token without a second round trip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from headrace.common.config import SpeculativeConfig
from headrace.services.scheduler.request import Request


class NgramProposer:
    """Prompt lookup: find an earlier occurrence of the sequence's last n tokens (the longest n from
    prompt_lookup_max down to prompt_lookup_min that occurs; the most recent occurrence of it) and propose
    the up to k tokens that followed it. Output that copies its input (summaries, edits, code) is full of them."""

    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.k = num_speculative_tokens
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, token_ids: list[int], max_drafts: int | None = None) -> list[int]:
        """Draft tokens to follow `token_ids` (at most k, at most max_drafts); [] when nothing matches."""
        k = self.k if max_drafts is None else min(self.k, max_drafts)
        length = len(token_ids)
        if k <= 0 or length <= self.min_n:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            # Windows that start before the suffix itself and are followed by at least one token.
            windows = sliding_window_view(tokens[: length - 1], n)
            hits = np.flatnonzero((windows == tokens[length - n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return token_ids[start: start + k]
        return []


@dataclass
class SpecDecodeStats:
    """Cumulative counters, as vLLM exports them (spec_decode_num_drafts, _num_draft_tokens,
    _num_accepted_tokens, _num_accepted_tokens_per_pos)."""

    num_drafts: int = 0  # verify steps of one request that carried at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_drafted:
            self.accepted_per_pos.extend([0] * (num_drafted - len(self.accepted_per_pos)))
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a verify step produced on average: the accepted drafts plus the one it samples itself."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0


# A draft token the worker's draft model proposes (method "draft_model"): the scheduler knows only how many.
WORKER_DRAFT = -1


class Speculation:
    """The scheduler's speculative-decoding policy for one engine."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        # None with a draft model: the worker proposes (drafts() then only says how many).
        self.proposer = None if config.uses_draft_model else NgramProposer(
            config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
        self.stats = SpecDecodeStats()

    def active(self, num_running: int) -> bool:
        """Whether this step proposes at all: past disable_by_batch_size the batch is no longer memory bound
        and verifying drafts costs more than it saves."""
        limit = self.config.disable_by_batch_size
        return limit is None or num_running <= limit

    @staticmethod
    def eligible(req: Request) -> bool:
        """Whether drafts can serve req exactly. A grammar's matcher would have to advance over drafts and roll
        back; logprobs would have to be gathered per accepted position: both run without drafts for now."""
        return req.grammar is None and req.sampling_params.logprobs is None

    def drafts(self, req: Request, token_budget: int) -> list[int]:
        """Drafts for req's next decode: at most token_budget of them, and none past its max_tokens (its last
        token is never drafted: the step's own sample may be it). With a draft model, as many WORKER_DRAFT
        placeholders as the worker's model is to propose."""
        room = min(token_budget, req.max_tokens - req.num_output_tokens - 1)
        if room <= 0:
            return []
        if self.proposer is None:
            return [WORKER_DRAFT] * min(self.config.num_speculative_tokens, room)
        return self.proposer.propose(req.all_token_ids, room)
