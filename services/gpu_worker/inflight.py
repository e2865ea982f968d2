"""Launched steps and their one queue: each step's sampled tokens stay on the device until it is resolved."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from itertools import islice

import torch

from headrace.common.messages import StepPlan, StepResult
from headrace.services.gpu_worker.request_state import RequestState
from headrace.services.gpu_worker.sampler import SamplerOutput


@dataclass
class InflightStep:
    """A launched step. Its sampled ids stay on the device until `resolve` copies them to the host and
    appends them to the requests' token lists; until then the next step's decodes read them from `sampled`.
    States are held by object, not id: a request aborted and re-added under the same id is a new state."""

    plan: StepPlan
    result: StepResult
    t0: float
    states: list[RequestState] = field(default_factory=list)
    row_of_state: dict[int, int] = field(default_factory=dict)  # id(state) -> row of `sampled`
    sampled: torch.Tensor | None = None  # [n] int64 on the device
    host: torch.Tensor | None = None  # [n] int64, pinned; valid once `event` has completed
    event: torch.cuda.Event | None = None
    resolved: bool = False
    # Speculative decoding: each state's drafts verified this step ([] for none), and how many were accepted
    # ([n] int64, on the host once `event` has completed); None when the step verified no drafts.
    drafts: list[list[int]] | None = None
    accepted: torch.Tensor | None = None
    block_size: int = 0

    def done(self) -> bool:
        """Whether resolving it would not block."""
        return self.resolved or self.event is None or self.event.query()

    def hold_sampled(self, states: list[RequestState], req_ids: list[str], out: SamplerOutput,
                     device: torch.device, drafts: list[list[int]] | None = None,
                     accepted: torch.Tensor | None = None, block_size: int = 0) -> None:
        """Keep the sampled ids on the device for the next step's decodes and start their copy to the host
        (and that of the accepted-draft counts, when the step verified drafts)."""
        self.drafts, self.block_size = drafts, block_size
        self.accepted = accepted
        if accepted is not None and device.type == "cuda":
            self.accepted = torch.empty(len(states), dtype=torch.int64, pin_memory=True)
            self.accepted.copy_(accepted, non_blocking=True)
        self.states = states
        self.row_of_state = {id(s): i for i, s in enumerate(states)}
        self.sampled = out.sampled_token_ids
        self.result.req_ids = req_ids
        self.result.logprobs = out.logprobs if out.logprobs is not None else [None] * len(states)
        if device.type == "cuda":
            self.host = torch.empty(len(states), dtype=torch.int64, pin_memory=True)
            self.host.copy_(out.sampled_token_ids, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = out.sampled_token_ids

    def resolve(self) -> None:
        """Bring the sampled tokens to the host and append them to their requests."""
        if self.resolved:
            return
        if self.event is not None:
            self.event.synchronize()
        sampled = self.host.tolist()
        if self.drafts is not None:
            self._accept_drafts()
        for state, tok in zip(self.states, sampled):
            state.append_token(tok)
        self.result.sampled_token_ids = sampled
        self.resolved = True
        self.sampled = None  # free the device tensor; later steps no longer read from it

    def _accept_drafts(self) -> None:
        """Each verifying request takes its accepted drafts (before its sampled token) and rolls its block
        table back past them; the counts go back to the scheduler in the result."""
        assert self.drafts is not None and self.accepted is not None
        for state, req_id, drafts, num in zip(self.states, self.result.req_ids, self.drafts, self.accepted.tolist()):
            if drafts:
                state.accept_drafts(drafts, num, self.block_size)
                self.result.num_accepted_drafts[req_id] = num


class InflightQueue:
    """Launched steps not yet finished, oldest first; they finish in launch order. At most the newest is
    unresolved (its tokens not yet on the host): the one the next step may read decode inputs from."""

    def __init__(self) -> None:
        self._steps: deque[InflightStep] = deque()

    def __len__(self) -> int:
        return len(self._steps)

    def resolve_all_but_newest(self) -> None:
        for older in islice(self._steps, max(len(self._steps) - 1, 0)):
            older.resolve()

    def unresolved_newest(self) -> InflightStep | None:
        """The newest step if its tokens are still on the device: the next step's decodes read them there."""
        newest = self._steps[-1] if self._steps else None
        return newest if newest is not None and not newest.resolved else None

    def push(self, step: InflightStep) -> None:
        self._steps.append(step)

    def oldest(self) -> InflightStep:
        assert self._steps, "no step in flight"
        return self._steps[0]

    def finish_oldest(self) -> InflightStep:
        """Wait for the oldest step's tokens and take it off the queue; its result is complete."""
        step = self.oldest()
        self._steps.popleft()
        step.resolve()
        step.result.execute_time = time.perf_counter() - step.t0
        return step

    def clear(self) -> None:
        self._steps.clear()
