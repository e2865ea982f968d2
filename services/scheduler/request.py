"""The scheduler's view of one request: its tokens, its KV blocks and where it stands in its life.

Length counters are properties so the policy in `scheduler.py` reads like prose
(`req.num_tokens - req.num_computed_tokens` is the work still to do).
"""

from __future__ import annotations

import enum
import sys
import time

from headrace.common.messages import TopLogprobs
from headrace.common.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # back in the waiting queue; resumes by recomputing prompt + outputs
    # Every finished state compares >= FINISHED_STOPPED (see `is_finished`).
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    __slots__ = (
        "req_id", "prompt_token_ids", "sampling_params", "sampling_seed", "eos_token_ids", "arrival_time",
        "_max_model_len", "_max_tokens", "output_token_ids", "output_logprobs", "status", "stop_reason",
        "block_ids", "block_hashes", "num_committed_blocks", "num_computed_tokens", "num_cached_tokens",
        "first_scheduled_time", "num_preemptions", "ending_token_ids", "_all_token_ids", "queued_time",
        "num_pending_tokens", "first_token_time", "grammar", "num_released_blocks",
    )

    def __init__(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        sampling_seed: int,
        eos_token_ids: tuple[int, ...] = (),
        arrival_time: float | None = None,
        max_model_len: int | None = None,
        grammar: str | None = None,
    ) -> None:
        self.req_id = req_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        # The engine draws one when sampling_params.seed is None, so a resumed request samples the same way.
        self.sampling_seed = sampling_seed
        self.eos_token_ids = tuple(eos_token_ids)
        # Every token that may end the request (EOS unless ignored, and stop_token_ids): the cheap
        # per-token test; the scheduler's stop check then applies min_tokens and names the reason.
        self.ending_token_ids = frozenset(sampling_params.stop_token_ids).union(
            () if sampling_params.ignore_eos else self.eos_token_ids)
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        # When the engine took it (arrival_time is the client's arrival at the api): queue time starts here.
        self.queued_time = time.time()
        # The scheduler binds this to its model's context length in add_request (which resolves max_tokens).
        self.max_model_len = max_model_len
        # EBNF the worker constrains sampling with (None: unconstrained); resent in full on every resumption.
        self.grammar = grammar

        self.output_token_ids: list[int] = []
        self.output_logprobs: list[TopLogprobs] = []
        self.status = RequestStatus.WAITING
        self.stop_reason: int | None = None  # the stop token id that finished the request

        # KV state, owned by the BlockManager: physical block per logical block, and the chained
        # content hash of each full block (kept across preemption: it depends only on the tokens).
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []
        self.num_committed_blocks = 0  # leading blocks registered in the prefix cache
        # Leading blocks given back because they fell out of an all-windowed model's window: their ids stay
        # in block_ids (logical block k is still block_ids[k]) but the request no longer holds them.
        self.num_released_blocks = 0
        # Tokens whose KV is (or is being, this step) written; advanced when the scheduler schedules them.
        self.num_computed_tokens = 0
        # Tokens being sampled by steps already planned but not yet returned (asynchronous scheduling plans
        # step t+1 before step t's tokens arrive): the sequence is num_tokens + num_pending_tokens long.
        self.num_pending_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hits at first admission; -1 until then
        self.first_scheduled_time: float | None = None
        # When the scheduler service saw the first output token (wall clock; set by services/scheduler/service.py,
        # which times the request's phases for the api's metrics). Kept across preemption, as the outputs are.
        self.first_token_time: float | None = None
        self.num_preemptions = 0
        # prompt + outputs in one list, so block hashing and resumption never concatenate.
        self._all_token_ids = list(self.prompt_token_ids)

    # ------------------------------------------------------------------ lengths

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt + output tokens: the length of the sequence the model has seen or will see."""
        return len(self._all_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + output tokens (the live list: read it, never mutate it)."""
        return self._all_token_ids

    @property
    def max_model_len(self) -> int | None:
        return self._max_model_len

    @max_model_len.setter
    def max_model_len(self, value: int | None) -> None:
        self._max_model_len = value
        # Resolved once here: the stop check reads max_tokens for every sampled token.
        limit = self.sampling_params.max_tokens
        if value is not None:
            # A prompt of exactly max_model_len still gets one token (the last token needs no KV slot).
            room = max(1, value - self.num_prompt_tokens)
            limit = room if limit is None else min(limit, room)
        self._max_tokens = sys.maxsize if limit is None else limit

    @property
    def max_tokens(self) -> int:
        """Output tokens allowed: sampling_params.max_tokens capped so prompt + outputs fit max_model_len."""
        return self._max_tokens

    # ------------------------------------------------------------------ state

    @property
    def is_finished(self) -> bool:
        return self.status >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def append_output_token(self, token_id: int, logprobs: TopLogprobs | None = None) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)

    def __repr__(self) -> str:
        return (f"Request({self.req_id!r}, {self.status.name}, tokens={self.num_prompt_tokens}+"
                f"{self.num_output_tokens}, computed={self.num_computed_tokens}, blocks={len(self.block_ids)})")
