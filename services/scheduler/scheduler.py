"""The continuous-batching policy: which requests run in the next step, with how many tokens each.

There are no prefill and decode phases. Every request has `num_tokens` (prompt + outputs so far) and
`num_computed_tokens` (those whose KV is written); a step gives each scheduled request some of the
difference. A decode is a request one token behind; a prefill is one further behind, and a long one is
split over several steps (chunked prefill) so decodes keep flowing beside it.

One step, in order:
  1. RUNNING requests, oldest admission first. Each decode takes one token; an unfinished prefill takes a
     chunk (capped by long_prefill_token_threshold), always leaving one token of budget for every running
     request behind it. When the KV pool runs dry, the most recently admitted running request is
     preempted (blocks freed, progress dropped, put back at the FRONT of the queue) until the allocation
     fits; if the request in hand is the last one left, it is preempted itself.
  2. WAITING requests while the token budget, max_num_seqs and the KV pool (minus a small watermark)
     allow: preempted ones first, then new ones taking turns across client requests (round robin over
     groups, first come first served within one), so one body of many prompts x n cannot queue ahead of
     every other client. A group is the engine request id up to its last '-' (the api names the engine
     requests of one HTTP request `<id>-<k>`). Skipped in a step that preempted anything. A running
     request whose last token (by max_tokens) is in flight is not scheduled again and holds no seat: with
     async scheduling the next plan admits its successor instead of waiting a step for it to leave.

Speculative decoding (services/scheduler/speculation.py): in step 1 a decode may also carry draft tokens
(StepPlan.spec_token_ids; 1 + d tokens scheduled). update_from_output appends the accepted drafts and the token
after them, and rolls the rejected drafts' KV back. A request that may draft waits while a step of its own is
in flight.

Conventions the worker relies on:
  - `num_computed_tokens` advances when a request is scheduled (here, not in update_from_output), so a
    plan's NewRequestData/CachedRequestData carry the count *before* the step: the worker computes
    tokens [num_computed_tokens, num_computed_tokens + num_scheduled_tokens[req_id]).
  - `plan.num_scheduled_tokens` is in batch order: new requests first, then cached ones, as listed in
    the plan; the worker lays its batch out in that dict's insertion order.
  - A request is sent as NewRequestData when the worker does not hold it (first admission, or resumption
    after preemption, which carries the outputs so far to recompute), as CachedRequestData afterwards.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Iterable

from headrace.common.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from headrace.common.messages import CachedRequestData, NewRequestData, RequestOutput, StepPlan, StepResult, TopLogprobs
from headrace.services.scheduler.block_manager import BlockManager
from headrace.services.scheduler.request import FINISH_REASONS, Request, RequestStatus
from headrace.services.scheduler.speculation import WORKER_DRAFT, Speculation

RUNNING = RequestStatus.RUNNING


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int,
                 max_model_len: int, kv_window: int | None = None, disjoint_steps: bool = False,
                 speculative: SpeculativeConfig | None = None) -> None:
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_num_batched_tokens = scheduler_config.token_budget
        threshold = scheduler_config.long_prefill_token_threshold
        # None (or not positive): a prefill chunk is bounded by the step's token budget alone.
        self.long_prefill_token_threshold = threshold if threshold and threshold > 0 else self.max_num_batched_tokens
        self.max_model_len = max_model_len
        # A model windowed in every layer: blocks that fall out of the window are freed as requests grow.
        self.kv_window = kv_window
        self.block_manager = BlockManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)

        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.waiting: OrderedDict[str, Request] = OrderedDict()  # FCFS; preempted ones re-enter at the front
        # The never-admitted waiting requests again, by group, groups in turn order (see step 2 above).
        self.groups: OrderedDict[str, OrderedDict[str, Request]] = OrderedDict()
        self.running: list[Request] = []  # admission order: the last is the first to be preempted
        self._finished_req_ids: list[str] = []  # finished or aborted since the last plan, held by the worker
        self._next_step_id = 0
        self.num_preemptions = 0
        # Prompt tokens looked up in the prefix cache at each request's first admission, and those found.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        # Pipeline parallelism: several steps in flight hold disjoint requests (micro-batches), since a stage
        # cannot read a token the last stage has not sampled yet. The requests of steps in flight wait here.
        self.in_flight: InFlightRequests | None = InFlightRequests() if disjoint_steps else None
        # Speculative decoding (services/scheduler/speculation.py); None: off.
        self.speculation = Speculation(speculative) if speculative is not None else None

    # ------------------------------------------------------------------ requests in and out

    def add_request(self, req: Request) -> None:
        """Queue a request. Raises ValueError for one that could never run."""
        n = req.num_prompt_tokens
        if req.req_id in self.requests:
            raise ValueError(f"request id {req.req_id!r} is already in use")
        if n == 0:
            raise ValueError("the prompt is empty")
        if n > self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens, more than max_model_len ({self.max_model_len})")
        req.max_model_len = self.max_model_len  # also resolves req.max_tokens
        # The longest it can get in KV: every token but the last sampled one is fed back.
        need = -(-(n + req.max_tokens - 1) // self.block_manager.block_size)
        if need > self.block_manager.num_blocks:
            raise ValueError(f"prompt + max_tokens need {need} KV blocks, the cache has "
                             f"{self.block_manager.num_blocks}; lower max_tokens")
        req.status = RequestStatus.WAITING
        self.requests[req.req_id] = req
        self.waiting[req.req_id] = req
        self.groups.setdefault(group_of(req.req_id), OrderedDict())[req.req_id] = req

    def abort_requests(self, req_ids: Iterable[str]) -> list[RequestOutput]:
        """Finish requests now, wherever they are; their blocks are freed at once. Unknown ids are ignored."""
        outputs = []
        for req_id in req_ids:
            req = self.requests.get(req_id)
            if req is None:
                continue
            if req.status != RUNNING:
                del self.waiting[req_id]
                self._ungroup(req)
            self._finish(req, RequestStatus.FINISHED_ABORTED)
            outputs.append(self._output(req, []))
        if outputs:
            self.running = [r for r in self.running if r.status == RUNNING]
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_waiting_tokens(self) -> int:
        """Tokens the waiting requests still have to prefill (the apis' --max-queued-tokens bound)."""
        return sum(req.num_tokens for req in self.waiting.values())

    @property
    def kv_usage(self) -> float:
        return self.block_manager.usage

    # ------------------------------------------------------------------ the step plan

    def schedule(self) -> StepPlan:
        """Plan the next step. An empty plan may still carry finished/preempted ids for the worker."""
        draft = _PlanDraft(self.max_num_batched_tokens)
        self._schedule_running(draft)
        if not draft.preempted:  # after a preemption memory is too tight to admit anyone
            self._admit_waiting(draft)
        plan = draft.plan(self._next_step_id, self._finished_req_ids)
        if self.in_flight is not None:
            self.in_flight.add(plan)
        self._next_step_id += 1
        self._finished_req_ids = []
        return plan

    def _schedule_running(self, draft: _PlanDraft) -> None:
        """Step 1: running requests, oldest admission first, preempting from the newest when blocks run out."""
        running = self.running
        spec = self.speculation if self.speculation is not None and self.speculation.active(len(running)) else None
        i = 0
        while i < len(running) and draft.budget > 0:
            req = running[i]
            if self.in_flight is not None and req.req_id in self.in_flight:
                i += 1  # its step is still in the pipeline
                continue
            if req.num_output_tokens + req.num_pending_tokens >= req.max_tokens:
                draft.finishing += 1  # its last token is already being sampled: it finishes when that step returns
                i += 1
                continue
            drafts = self._drafts(spec, req, draft.budget - (len(running) - i))
            if drafts is None:  # it may draft and a step of its own is in flight: it waits for that step's tokens
                i += 1
                continue
            num_new = req.num_tokens + req.num_pending_tokens - req.num_computed_tokens + len(drafts)
            if num_new > 1:  # still prefilling: a chunk that leaves one token for each request behind it
                num_new = min(num_new, self.long_prefill_token_threshold, draft.budget - (len(running) - 1 - i))
            if num_new <= 0:
                i += 1
                continue
            new_block_ids = self._allocate_or_preempt(req, num_new, draft)
            if new_block_ids is None:
                return  # req was the last running request and made room by preempting itself
            draft.cached_reqs.append(CachedRequestData(req.req_id, new_block_ids, req.num_computed_tokens,
                                                       self._tokens_for_stages(req)))
            draft.cached_counts[req.req_id] = num_new
            req.num_computed_tokens += num_new
            if drafts:
                draft.add_drafts(req.req_id, drafts)
                req.num_pending_tokens = 1  # this step verifies the drafts and samples one token past them
            elif req.num_computed_tokens == req.num_tokens + req.num_pending_tokens:
                req.num_pending_tokens += 1  # this step samples its next token
            draft.budget -= num_new
            i += 1

    def _tokens_for_stages(self, req: Request) -> list[int]:
        """Pipeline parallelism: the request's last sampled token, for the stages that did not sample it
        (each appends it only if it lacks it). With disjoint steps, one token at most arrived since the
        request's previous step."""
        if self.in_flight is None or not req.output_token_ids:
            return []
        return [req.output_token_ids[-1]]

    def _drafts(self, spec: Speculation | None, req: Request, budget: int) -> list[int] | None:
        """Draft tokens for req's decode this step ([] for none), or None when req must wait: it may draft and
        a step of its own is still in flight (the next drafts continue from that step's tokens)."""
        if spec is None or not spec.eligible(req):
            return []
        if req.num_pending_tokens:
            return None
        if req.num_computed_tokens != req.num_tokens - 1:  # still prefilling
            return []
        drafts = spec.drafts(req, budget)
        bm = self.block_manager
        if drafts and -(-(req.num_tokens + len(drafts)) // bm.block_size) - len(req.block_ids) > bm.num_free_blocks:
            return []  # drafts never preempt anyone: when blocks are short the request just decodes
        return drafts

    def _allocate_or_preempt(self, req: Request, num_new: int, draft: _PlanDraft) -> list[int] | None:
        """Blocks for req's next num_new tokens, preempting the newest running requests until they fit;
        None when req itself had to go. Blocks out of an all-windowed model's window are given back first."""
        if self.kv_window:
            self.block_manager.release_out_of_window(req, self.kv_window)
        while (new_block_ids := self.block_manager.allocate_slots(req, num_new)) is None:
            victim = self.running.pop()  # only requests behind req: none of them is in this plan yet
            self._preempt(victim)
            draft.preempted.append(victim.req_id)
            if victim is req:
                return None
        return new_block_ids

    def _admit_waiting(self, draft: _PlanDraft) -> None:
        """Step 2: waiting requests, first come first served, while budget, seats and blocks allow."""
        bm = self.block_manager
        now = time.time()
        waiting, running = self.waiting, self.running
        # max_num_seqs bounds the requests in a step; one leaving with the step in flight takes no seat.
        while waiting and draft.budget > 0 and len(running) - draft.finishing < self.max_num_seqs:
            req = self._next_waiting()
            if self.in_flight is not None and req.req_id in self.in_flight:
                return  # preempted while its step is in the pipeline: it resumes once that step is back
            hits, num_hits = bm.get_computed_blocks(req)
            num_new = min(req.num_tokens - num_hits, self.long_prefill_token_threshold, draft.budget)
            # Keep the watermark free for running requests to grow into; a lone request needs no headroom.
            if running and not bm.can_allocate(req, num_new, hits):
                return
            if bm.allocate_slots(req, num_new, hits) is None:
                return
            del waiting[req.req_id]
            self._ungroup(req, took_turn=True)
            running.append(req)
            self._start_running(req, num_hits, now)
            draft.new_reqs.append(NewRequestData(
                req.req_id, req.prompt_token_ids, list(req.output_token_ids), req.sampling_params,
                list(req.block_ids), num_hits, req.sampling_seed, req.grammar))
            draft.new_counts[req.req_id] = num_new
            req.num_computed_tokens += num_new
            if req.num_computed_tokens == req.num_tokens:
                req.num_pending_tokens = 1
            draft.budget -= num_new

    def _next_waiting(self) -> Request:
        """The waiting request to admit next: a preempted one (they queue at the front), else the oldest of the
        group whose turn it is."""
        head = next(iter(self.waiting.values()))
        if head.status == RequestStatus.PREEMPTED or not self.groups:
            return head
        return next(iter(next(iter(self.groups.values())).values()))

    def _ungroup(self, req: Request, took_turn: bool = False) -> None:
        """Drop a never-admitted request from its group; a group that `took_turn` goes to the back of the line."""
        key = group_of(req.req_id)
        members = self.groups.get(key)
        if members is None or members.pop(req.req_id, None) is None:
            return
        if not members:
            del self.groups[key]
        elif took_turn:
            self.groups.move_to_end(key)

    def _start_running(self, req: Request, num_hits: int, now: float) -> None:
        """An admitted request: its cached prefix counts as computed; its first admission is recorded."""
        req.status = RUNNING
        req.num_computed_tokens = num_hits
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_hits  # reported as the prompt's cache hits: first admission only
            if self.block_manager.enable_prefix_caching:
                self.prefix_cache_queries += req.num_tokens
                self.prefix_cache_hits += num_hits
        if req.first_scheduled_time is None:
            req.first_scheduled_time = now

    def _preempt(self, req: Request) -> None:
        """Drop req's KV and progress; it resumes from the front of the queue by recomputation."""
        self.block_manager.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_pending_tokens = 0  # a token still in flight is dropped on arrival and sampled again later
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting[req.req_id] = req
        self.waiting.move_to_end(req.req_id, last=False)

    # ------------------------------------------------------------------ the step's results

    def update_from_output(self, plan: StepPlan, result: StepResult) -> list[RequestOutput]:
        """Apply one step's sampled tokens; finished requests free their blocks and leave the running set.

        Returns one RequestOutput per request that got a token (finished or not). A request aborted
        since the plan was made is skipped: its token arrives too late to matter.
        """
        if result.step_id != plan.step_id:
            raise ValueError(f"result of step {result.step_id} applied to plan {plan.step_id}")
        if self.in_flight is not None:
            self.in_flight.remove(plan)
        requests = self.requests
        # The verified drafts: the plan's (n-gram), or those the worker's draft model proposed in the step.
        drafted = plan.spec_token_ids or result.draft_token_ids
        if self.block_manager.enable_prefix_caching:
            # The step has written these tokens' KV: their full blocks may now serve other prompts. (A later
            # step may already be planned, so what is written comes from this plan, not the request.) Drafted
            # requests commit below, once their accepted tokens are known.
            before = {r.req_id: r.num_computed_tokens for r in plan.new_requests}
            before.update((r.req_id, r.num_computed_tokens) for r in plan.cached_requests)
            for req_id, count in plan.num_scheduled_tokens.items():
                req = requests.get(req_id)
                if req is not None and req.status == RUNNING and req_id not in drafted \
                        and req_id not in plan.num_draft_tokens:
                    self.block_manager.commit_blocks(req, before[req_id] + count)

        outputs = self._fail_requests(result.failed) if result.failed else []
        any_finished = False
        for req_id, token_id, logprobs in zip(result.req_ids, result.sampled_token_ids,
                                              result.logprobs or itertools.repeat(None)):
            req = requests.get(req_id)
            if req is None or req.status != RUNNING or req.num_pending_tokens == 0:
                continue  # finished, aborted or preempted since this step was planned
            req.num_pending_tokens -= 1
            new_tokens = [token_id]
            if req_id in drafted:
                new_tokens = self._accept_drafts(req, drafted[req_id], result.num_accepted_drafts.get(req_id, 0),
                                                 token_id)
            new_logprobs = None if logprobs is None else [logprobs]
            status = self._append_outputs(req, new_tokens, logprobs)
            if req_id in drafted:  # full blocks of accepted tokens only
                self.block_manager.commit_blocks(req, min(req.num_computed_tokens, req.num_tokens))
            if status is not None:
                self._finish(req, status)
                any_finished = True
                outputs.append(self._output(req, new_tokens, new_logprobs))
                continue
            outputs.append(RequestOutput(req_id, new_tokens, new_logprobs, False, None, None,
                                         len(req.prompt_token_ids), req.num_cached_tokens))
        if result.prompt_logprobs:  # scoring requests: the prompt's logprobs ride with the first token
            for out in outputs:
                out.prompt_logprobs = result.prompt_logprobs.get(out.req_id)
        if any_finished:
            self.running = [r for r in self.running if r.status == RUNNING]
        return outputs

    def _fail_requests(self, failed: dict[str, str]) -> list[RequestOutput]:
        """Requests the worker could not serve for a fault of their own end alone, each with a 400 saying
        why (their token of this step, if any, is then skipped as an aborted request's)."""
        outputs = self.abort_requests(failed)
        for out in outputs:
            out.finish_reason, out.error, out.error_code = "error", failed[out.req_id], 400
        return outputs

    def _append_outputs(self, req: Request, tokens: list[int], logprobs: TopLogprobs | None) -> RequestStatus | None:
        """Append tokens to req up to the first that stops it (those after it are cut from `tokens`, in place);
        the stop status, or None."""
        for k, token_id in enumerate(tokens):
            req.append_output_token(token_id, logprobs)
            # Cheap test first (this runs for every token); _check_stop sorts out the reason.
            if token_id in req.ending_token_ids or len(req.output_token_ids) >= req.max_tokens:
                status = self._check_stop(req, token_id)
                if status is not None:
                    del tokens[k + 1:]
                    return status
        return None

    def _accept_drafts(self, req: Request, drafts: list[int], num_accepted: int, token_id: int) -> list[int]:
        """A verify step's new tokens: the accepted drafts, then the token sampled after them. The rejected
        drafts' KV is rolled back: they no longer count as computed and blocks past the accepted length go."""
        self.speculation.stats.observe(len(drafts), num_accepted)
        req.num_computed_tokens -= len(drafts) - num_accepted
        self.block_manager.trim(req, req.num_computed_tokens)
        return drafts[:num_accepted] + [token_id]

    @staticmethod
    def _check_stop(req: Request, token_id: int) -> RequestStatus | None:
        """Why req stops after sampling token_id, or None. Stop strings are the tokenizer's job."""
        params = req.sampling_params
        num_output = req.num_output_tokens
        if num_output >= params.min_tokens:
            if token_id in req.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                req.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        # max_tokens is already capped so that prompt + outputs never exceed max_model_len.
        if num_output >= req.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, req: Request, status: RequestStatus) -> None:
        """Mark req finished and free its blocks; the caller removes it from the running list or queue."""
        if req.status == RUNNING:  # the worker holds its state (a preempted request's was already dropped)
            self._finished_req_ids.append(req.req_id)
        req.status = status
        self.block_manager.free(req)
        del self.requests[req.req_id]

    @staticmethod
    def _output(req: Request, new_token_ids: list[int],
                new_logprobs: list[TopLogprobs] | None = None) -> RequestOutput:
        finished = req.is_finished
        return RequestOutput(
            req.req_id, new_token_ids, new_logprobs, finished,
            FINISH_REASONS[req.status] if finished else None, req.stop_reason,
            req.num_prompt_tokens, max(req.num_cached_tokens, 0))


def group_of(req_id: str) -> str:
    """The client request an engine request belongs to: its id up to the last '-' (the whole id if none)."""
    return req_id.rpartition("-")[0] or req_id


class InFlightRequests:
    """Requests of the steps in flight, counted per request (a preempted request may be re-planned only
    after its step is back, so a count is at most one; counting keeps `remove` exact regardless)."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._counts

    def add(self, plan: StepPlan) -> None:
        for req_id in plan.num_scheduled_tokens:
            self._counts[req_id] = self._counts.get(req_id, 0) + 1

    def remove(self, plan: StepPlan) -> None:
        for req_id in plan.num_scheduled_tokens:
            left = self._counts.get(req_id, 0) - 1
            if left > 0:
                self._counts[req_id] = left
            else:
                self._counts.pop(req_id, None)


class _PlanDraft:
    """The plan of one step while `Scheduler.schedule` builds it."""

    __slots__ = ("budget", "finishing", "cached_reqs", "cached_counts", "new_reqs", "new_counts", "preempted",
                 "spec_token_ids", "num_draft_tokens")

    def __init__(self, budget: int) -> None:
        self.budget = budget  # tokens left this step
        self.finishing = 0  # running requests whose last token is in flight: their seats are free this step
        self.cached_reqs: list[CachedRequestData] = []
        self.cached_counts: dict[str, int] = {}
        self.new_reqs: list[NewRequestData] = []
        self.new_counts: dict[str, int] = {}
        self.preempted: list[str] = []
        self.spec_token_ids: dict[str, list[int]] = {}  # drafts of the requests that verify some this step
        self.num_draft_tokens: dict[str, int] = {}  # the same, for drafts the worker's draft model proposes

    def add_drafts(self, req_id: str, drafts: list[int]) -> None:
        if drafts[0] == WORKER_DRAFT:  # placeholders: the worker proposes them
            self.num_draft_tokens[req_id] = len(drafts)
        else:
            self.spec_token_ids[req_id] = drafts

    def plan(self, step_id: int, finished_req_ids: list[str]) -> StepPlan:
        counts = self.new_counts
        if counts:
            counts.update(self.cached_counts)  # batch order: new requests first, then cached
        return StepPlan(step_id, self.new_reqs, self.cached_reqs, counts or self.cached_counts, finished_req_ids,
                        self.preempted, self.spec_token_ids, self.num_draft_tokens)
