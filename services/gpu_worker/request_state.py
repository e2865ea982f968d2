"""What the worker keeps per request between steps."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any

import numpy as np

from headrace.common.sampling_params import SamplingParams
from headrace.services.gpu_worker.prompt_logprobs import PromptScores

log = logging.getLogger(__name__)


class RequestState:
    """A request's tokens, block table and progress on this worker. The block table lives in a growable
    numpy row so a step's batch table is assembled with array copies, not Python loops over block ids."""

    __slots__ = ("req_id", "token_ids", "num_prompt_tokens", "block_table", "num_blocks", "num_computed_tokens",
                 "params", "seed", "prompt_scores", "grammar", "matcher", "draft_token_ids", "draft_probs",
                 "draft_computed")

    def __init__(self, req_id: str, token_ids: list[int], num_prompt_tokens: int, block_ids: list[int],
                 num_computed_tokens: int, params: SamplingParams, seed: int, grammar: Future | None = None):
        self.req_id = req_id
        self.token_ids = token_ids  # prompt + every token sampled so far
        self.num_prompt_tokens = num_prompt_tokens
        self.block_table = np.zeros(max(16, 2 * len(block_ids)), dtype=np.int32)
        self.num_blocks = 0
        self.num_computed_tokens = num_computed_tokens
        self.params = params
        self.seed = seed
        # Prompt logprobs still to deliver: asked for, and no output yet (a request resumed after preemption
        # with outputs delivered them before it was preempted).
        self.prompt_scores = (PromptScores(params.prompt_logprobs)
                              if params.prompt_logprobs is not None and len(token_ids) == num_prompt_tokens else None)
        # A constrained request's compiled grammar (being compiled, maybe) and, from its first sampling on,
        # the matcher its tokens advance (grammar.py). Both None for an unconstrained request.
        self.grammar = grammar
        self.matcher: Any = None
        # Draft tokens the current plan asks to verify after the newest token (speculative decoding); [] if none.
        self.draft_token_ids: list[int] = []
        # A draft model's drafts only (draft_model.py): [len(draft_token_ids), V] the distribution each was drawn
        # from, and how many of the request's tokens have their KV written in the draft's cache. A new state (a
        # resumed request too) starts at 0: the draft then computes the whole prefix itself, so a prefix-cache
        # hit, whose draft KV nothing guarantees, is never read by it.
        self.draft_probs: Any = None
        self.draft_computed = 0
        self.add_blocks(block_ids)

    def add_blocks(self, block_ids: list[int]) -> None:
        end = self.num_blocks + len(block_ids)
        if end > len(self.block_table):
            grown = np.zeros(2 * end, dtype=np.int32)
            grown[: self.num_blocks] = self.block_table[: self.num_blocks]
            self.block_table = grown
        self.block_table[self.num_blocks : end] = block_ids
        self.num_blocks = end

    def accept_drafts(self, drafts: list[int], num_accepted: int, block_size: int) -> None:
        """After a verify step: the accepted drafts join the request (the sampled token follows them) and the
        block table drops blocks past the accepted KV, as the scheduler's BlockManager.trim does (the same rule:
        ceil(tokens with valid KV / block_size) blocks kept; num_computed_tokens is still this step's start)."""
        for token_id in drafts[:num_accepted]:
            self.append_token(token_id)
        # The draft model's KV is valid as far as its fed drafts were accepted (and never past the tokens).
        self.draft_computed = min(self.draft_computed, len(self.token_ids))
        keep = -(-(self.num_computed_tokens + 1 + num_accepted) // block_size)
        self.num_blocks = min(self.num_blocks, keep)

    def append_token(self, token_id: int) -> None:
        """A sampled token joins the request (and advances its grammar)."""
        self.token_ids.append(token_id)
        matcher = self.matcher
        if matcher is not None and not matcher.is_terminated() and not matcher.accept_token(token_id):
            # Only reachable when every allowed token was also blocked (min_tokens over a finished grammar).
            log.warning("request %s: sampled token %d does not follow its grammar", self.req_id, token_id)
