"""What the worker keeps per request between steps."""

from __future__ import annotations

import numpy as np

from headrace.common.sampling_params import SamplingParams
from headrace.services.gpu_worker.prompt_logprobs import PromptScores


class RequestState:
    """A request's tokens, block table and progress on this worker. The block table lives in a growable
    numpy row so a step's batch table is assembled with array copies, not Python loops over block ids."""

    __slots__ = ("req_id", "token_ids", "num_prompt_tokens", "block_table", "num_blocks", "num_computed_tokens",
                 "params", "seed", "prompt_scores")

    def __init__(self, req_id: str, token_ids: list[int], num_prompt_tokens: int, block_ids: list[int],
                 num_computed_tokens: int, params: SamplingParams, seed: int):
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
        self.add_blocks(block_ids)

    def add_blocks(self, block_ids: list[int]) -> None:
        end = self.num_blocks + len(block_ids)
        if end > len(self.block_table):
            grown = np.zeros(2 * end, dtype=np.int32)
            grown[: self.num_blocks] = self.block_table[: self.num_blocks]
            self.block_table = grown
        self.block_table[self.num_blocks : end] = block_ids
        self.num_blocks = end
