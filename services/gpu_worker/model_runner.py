"""The model runner: the worker's model, KV cache and request state, and the steps launched on them.

It receives `StepPlan`s that carry only what changed (new requests in full, running ones as ids + new
blocks), applies them to each request's state, builds one flat batch that mixes decode tokens and prefill
chunks (batch_inputs), runs the model (from CUDA graphs where one accepts the step), computes logits only
for positions that sample, and samples the batch on the device. Launched steps wait in one queue
(inflight) until their tokens are read back; the worker and the in-process engine both go through it.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from headrace.common.config import EngineConfig, resolve_device
from headrace.common.messages import StepPlan, StepResult
from headrace.services.gpu_worker.attention import make_backend
from headrace.services.gpu_worker.batch_inputs import PreparedBatch, long_rope_restarts, prepare_batch
from headrace.services.gpu_worker.cpu_compiled_decode import maybe_compile_decode
from headrace.services.gpu_worker.cuda_graphs import DecodeGraphs, maybe_capture_decode_graphs
from headrace.services.gpu_worker.draft_model import DraftModel
from headrace.services.gpu_worker.grammar import GrammarError, GrammarRuntime
from headrace.services.gpu_worker.graph_runner import GraphRunner
from headrace.services.gpu_worker.inflight import InflightQueue, InflightStep
from headrace.services.gpu_worker.kv_cache import KVCacheLayout, describe_kv_cache, kv_cache_dtype
from headrace.services.gpu_worker.kv_sizing import (
    check_holds_one_sequence,
    configured_num_blocks,
    profile_gpu_num_blocks,
)
from headrace.services.gpu_worker.loader.model_loader import load_model, resolve_dtype
from headrace.services.gpu_worker.model.rope import long_rope_rows, rope_cos_sin_cache
from headrace.services.gpu_worker.model.llama import ForwardContext
from headrace.services.gpu_worker.parallel import SINGLE, TPGroup
from headrace.services.gpu_worker.piecewise_graphs import PiecewiseGraphs, maybe_capture_piecewise_graphs
from headrace.services.gpu_worker.pipeline import SINGLE_STAGE, PipelineStage
from headrace.services.gpu_worker.prompt_logprobs import score_prompt_spans
from headrace.services.gpu_worker.rejection_sampler import accept_drafts, accept_model_drafts, verify_rows
from headrace.services.gpu_worker.request_state import RequestState
from headrace.services.gpu_worker.sampler import Sampler, SamplerOutput, build_sampling_inputs

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TPGroup = SINGLE, device: str | None = None,
                 log=print, stage: PipelineStage = SINGLE_STAGE):
        resolved = config.require_resolved()
        self.config = config
        self.device = torch.device(device or resolve_device(config.device))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.tp = tp
        self.stage = stage  # a pipeline stage runs its layers only and passes hidden states on (pipeline.py)
        self.log = log
        self.requests: dict[str, RequestState] = {}
        if self.device.type == "cpu":
            # Data-parallel replicas on one CPU share its cores rather than each spinning a thread on every one.
            cores = len(os.sched_getaffinity(0)) // config.parallel.data_parallel_size
            torch.set_num_threads(config.parallel.cpu_threads or max(1, cores))
        t0 = time.perf_counter()
        dtype = resolve_dtype(config.model.dtype, self.device)
        loaded = load_model(resolved, self.device, dtype, tp, seed=config.model.seed, quant=resolved.quantization,
                            stage=stage.layers, init_std=config.model.random_init_std)
        self.load_seconds = time.perf_counter() - t0
        weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        quant = resolved.quantization
        log(f"weights: {weight_bytes / 2**30:.2f} GiB on this rank ("
            + (f"{quant.checkpoint_format} {quant.kind}{quant.bits if quant.kind == 'int' else ''}" if quant
               else str(dtype).removeprefix("torch.")) + f"), loaded in {self.load_seconds:.1f} s")
        self.model, self.arch, self.hf_config, self.dtype = loaded.model, loaded.arch, loaded.hf_config, loaded.dtype
        self.eos_token_ids = resolved.eos_token_ids
        self.max_model_len = resolved.max_model_len
        self.block_size = config.cache.block_size
        self.long_rope = long_rope_rows(self.arch, self.max_model_len)  # LongRoPE's second table, where used
        self.cos_sin_cache = rope_cos_sin_cache(self.hf_config, self.arch.head_dim, self.max_model_len, self.device,
                                                self.long_rope)
        self.backend = make_backend(config.attention_backend, self.device, self.block_size)
        self.kv_layout = KVCacheLayout(len(self.model.layers), self.block_size,
                                       self.model.layers[0].self_attn.num_kv_heads, self.arch.head_dim,
                                       kv_cache_dtype(config.cache.kv_cache_dtype, self.dtype))
        # The speculative draft model, loaded before the KV cache is sized (its weights take memory too).
        self.drafter = DraftModel(config, self.device, self.dtype, self.block_size) \
            if config.speculative is not None and config.speculative.uses_draft_model else None
        self.num_blocks = self._num_kv_blocks()
        self.kv_caches = self.kv_layout.allocate(self.num_blocks, self.device)
        if self.drafter is not None:
            self.drafter.allocate(self.num_blocks)
            log(f"draft model {self.drafter.name}: its own KV cache of {self.num_blocks} blocks")
        log(describe_kv_cache(self.kv_layout, self.num_blocks, [lay.self_attn.kv_scale for lay in self.model.layers]))
        self.sampler = Sampler()
        self.grammars = GrammarRuntime(resolved.tokenizer_dir, self.arch.vocab_size, self.eos_token_ids)
        # Decode-only steps replay CUDA graphs; other steps up to a token ladder's top replay everything but
        # attention from piecewise graphs (None: such steps run eagerly).
        self.decode_graphs: DecodeGraphs | None
        self.piecewise_graphs: PiecewiseGraphs | None
        self.decode_graphs, self.piecewise_graphs = self._warm_up_and_capture()
        # On a CPU with --compile-decode: decode-only steps run as compiled graphs.
        self.compiled_decode = maybe_compile_decode(
            config.compile_decode and not config.enforce_eager, self.model, self.kv_caches, self.cos_sin_cache,
            self.block_size, config.scheduler.max_num_seqs, self.long_rope, self.stage.size, tp.size, self.device,
            log)
        self._in_flight = InflightQueue()  # launched steps, oldest first: the one queue of them

    # ------------------------------------------------------------------ construction

    def _num_kv_blocks(self) -> int:
        num_blocks = configured_num_blocks(self.config.cache, self.kv_layout, self.device)
        if num_blocks is None:
            num_blocks = profile_gpu_num_blocks(self.model, self.backend, self.cos_sin_cache, self.kv_layout,
                                                self.config, self.max_model_len, self.device, log=self.log)
        if self.drafter is not None and self.config.cache.num_blocks is None:  # a byte budget holds both caches
            target = self.kv_layout.bytes_per_block
            num_blocks = num_blocks * target // (target + self.drafter.kv_layout.bytes_per_block)
        return check_holds_one_sequence(num_blocks, self.block_size, self.max_model_len)

    def _warm_up_and_capture(self) -> tuple[DecodeGraphs | None, PiecewiseGraphs | None]:
        """Compile the attention kernels' variants, capture both kinds of graphs, then compile the sampling
        kernel's variants: no request pays for a compile. Off CUDA, nothing compiles and graphs are off."""
        sched, cuda, tp_size = self.config.scheduler, self.device.type == "cuda", self.tp.size
        if cuda:
            self.backend.warm_up(self.kv_caches[0], self.model.layers[0].self_attn.num_heads, sched.max_num_seqs,
                                 min(sched.token_budget, self.max_model_len), softcap=self.arch.attn_logit_softcap,
                                 q_dtype=self.dtype)
            self.model.warm_up_experts(sched.token_budget)
            if self.drafter is not None:
                self.drafter.warm_up(sched.max_num_seqs, min(sched.token_budget, self.max_model_len))
        decode = piecewise = None  # graphs per stage are not built yet: pipeline stages run eagerly
        if self.stage.size == 1:
            decode = maybe_capture_decode_graphs(self.config, self.model, self.backend, self.kv_caches,
                                                 self.cos_sin_cache, self.device, tp_size, self.max_model_len,
                                                 self.block_size, log=self.log)
            piecewise = maybe_capture_piecewise_graphs(self.config, self.model, self.backend, self.kv_caches,
                                                       self.cos_sin_cache, self.device, tp_size, log=self.log)
        if cuda:  # with speculation a request samples up to 1 + k rows
            k = self.config.speculative.num_speculative_tokens if self.config.speculative is not None else 0
            rows = min(sched.max_num_seqs * (1 + k), max(sched.token_budget, sched.max_num_seqs))
            self.sampler.warm_up(self.arch.vocab_size, rows, self.device)
        return decode, piecewise

    @property
    def graph_runners(self) -> list[GraphRunner]:
        """Tried in this order for each step; a step none accepts runs eagerly."""
        return [g for g in (self.decode_graphs, self.piecewise_graphs, self.compiled_decode) if g is not None]

    # ------------------------------------------------------------------ the in-flight queue

    @property
    def num_in_flight(self) -> int:
        """Steps launched and not yet finished."""
        return len(self._in_flight)

    def oldest_done(self) -> bool:
        """Whether finishing the oldest launched step would not block."""
        return self._in_flight.oldest().done()

    @property
    def oldest_plan(self) -> StepPlan:
        return self._in_flight.oldest().plan

    def finish_oldest(self) -> tuple[StepPlan, StepResult]:
        """Wait for the oldest launched step's tokens; its plan and result."""
        step = self._in_flight.finish_oldest()
        return step.plan, step.result

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step alone and wait for its tokens."""
        assert not self._in_flight, "finish the launched steps first"
        self.launch(plan)
        return self.finish_oldest()[1]

    def reset(self) -> None:
        """Forget every launched step and every request (after a failure: the scheduler starts over)."""
        self._in_flight.clear()
        self.requests.clear()

    # ------------------------------------------------------------------ the step

    def _apply_plan(self, plan: StepPlan) -> None:
        for rid in plan.finished_req_ids:
            self.requests.pop(rid, None)
        for rid in plan.preempted_req_ids:
            self.requests.pop(rid, None)
        for new in plan.new_requests:
            self.requests[new.req_id] = RequestState(
                new.req_id, list(new.prompt_token_ids) + list(new.output_token_ids), len(new.prompt_token_ids),
                new.block_ids, new.num_computed_tokens, new.sampling_params, new.sampling_seed,
                None if new.grammar is None else self.grammars.start(new.grammar))
        for cached in plan.cached_requests:
            state = self.requests[cached.req_id]
            if cached.new_block_ids:
                state.add_blocks(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens
            if cached.new_token_ids:  # pipeline stages that do not sample learn the tokens from the plan
                missing = cached.num_computed_tokens + plan.num_scheduled_tokens[cached.req_id] - len(state.token_ids)
                if missing > 0:
                    state.token_ids.extend(cached.new_token_ids[-missing:])
        for rid, drafts in plan.spec_token_ids.items():
            self.requests[rid].draft_token_ids = list(drafts)

    @torch.no_grad()
    def launch(self, plan: StepPlan) -> None:
        """Apply the plan and queue its forward and sampling on the device without waiting for them.

        At most one launched step stays unresolved (its tokens not yet on the host): the one this step may
        read decode inputs from. Steps are finished in launch order."""
        t0 = time.perf_counter()
        self._in_flight.resolve_all_but_newest()
        pending = self._in_flight.unresolved_newest()
        self._apply_plan(plan)
        step = InflightStep(plan, StepResult(step_id=plan.step_id), t0)
        if plan.is_empty:
            step.resolved = True
        else:
            needs_host = pending is not None and self._needs_host_tokens(plan, pending)
            # Penalties and grammars need the pending tokens on the host to sample, not to run the forward (its
            # inputs are read on the device): the GPU runs the forward while the host waits for them, advances
            # the grammars and fills the masks. Drafting reads them before the forward.
            late = needs_host and not (plan.num_draft_tokens or plan.spec_token_ids)
            if pending is not None and (self._restarts_long_rope(plan) or (needs_host and not late)):
                pending.resolve()
                pending = None
            self._run(step, pending, late)
        self._in_flight.push(step)

    def _run(self, step: InflightStep, pending: InflightStep | None, resolve_pending_late: bool = False) -> None:
        """Prepare, forward and sample the step's batch on the device; with `resolve_pending_late`, the pending
        step's tokens come to the host after the forward is queued, before sampling."""
        if step.plan.num_draft_tokens:  # the draft model proposes what this step verifies (draft_model.py)
            assert self.drafter is not None, "a plan with draft-model drafts for a worker without a draft model"
            drafting = step.plan.num_draft_tokens
            self.drafter.propose([self.requests[rid] for rid in drafting], list(drafting.values()),
                                 self.eos_token_ids)
        batch = prepare_batch(self.requests, step.plan.num_scheduled_tokens, self.block_size, self.device, pending,
                              long_rope=self.long_rope)
        hidden = self._forward(batch)
        if not self.stage.is_last:  # the next stage has the hidden states; the last one samples
            self.stage.send(hidden)
            step.resolved = True
            return
        if batch.prompt_spans:
            score_prompt_spans(batch.prompt_spans, hidden, self.model.compute_logits)
        if not batch.sample_req_ids:
            step.resolved = True
            return
        logits = self.model.compute_logits(hidden.index_select(0, batch.logits_indices))
        if resolve_pending_late and pending is not None:
            pending.resolve()
            pending = None
        out, drafts, accepted = self._sample(logits, batch, pending, step.result)
        step.hold_sampled(batch.sample_states, batch.sample_req_ids, out, self.device, drafts, accepted,
                          self.block_size)
        for state in batch.sample_states:
            if state.prompt_scores is not None:  # the prompt is done: its scores go with the first token
                step.result.prompt_logprobs[state.req_id] = state.prompt_scores.take()
                state.prompt_scores = None

    def _start_matchers(self, states: list[RequestState], result: StepResult) -> None:
        """A constrained request's first sampling needs its grammar compiled. One that does not compile fails
        that request alone: it is reported in `result.failed`, samples unconstrained this once (the
        scheduler drops the token) and is left unconstrained until the scheduler's next plan drops it."""
        for s in states:
            if s.grammar is not None and s.matcher is None:
                try:
                    s.matcher = self.grammars.matcher(s.grammar, s.token_ids[s.num_prompt_tokens:])
                except GrammarError as e:
                    log.warning("request %s: %s", s.req_id, e)
                    result.failed[s.req_id] = str(e)
                    s.grammar = None

    def _sample(self, logits: torch.Tensor, batch: PreparedBatch, pending: InflightStep | None, result: StepResult
                ) -> tuple[SamplerOutput, list[list[int]] | None, torch.Tensor | None]:
        """Sample every logits row; requests verifying drafts keep the token after their accepted ones
        (rejection_sampler). Returns the per-request output, and the drafts and accepted counts (None if none)."""
        pending_rows = pending.row_of_state if pending is not None else {}
        self._start_matchers(batch.sample_states, result)
        rows = []
        for s in batch.sample_states:
            rows += verify_rows(s, self.eos_token_ids, 1 if id(s) in pending_rows else 0, s.matcher)
        inputs = build_sampling_inputs(rows, self.arch.vocab_size, self.device, self.grammars.fill_bitmasks)
        verifying = len(rows) > len(batch.sample_states)
        # Verifying a draft model's tokens needs the target's distributions too: from the same penalised logits.
        out = self.sampler(logits, inputs, with_probabilities=verifying and self.drafter is not None)
        if not verifying:
            return out, None, None
        states = batch.sample_states
        drafts = [s.draft_token_ids for s in states]
        if self.drafter is None:
            tokens, accepted = accept_drafts(out.sampled_token_ids, drafts)
        else:  # drafts drawn from the draft model's q: the general test, against the target's p
            tokens, accepted = accept_model_drafts(
                out.sampled_token_ids, out.probabilities, drafts,
                [s.draft_probs for s in states], [s.seed for s in states],
                [len(s.token_ids) - s.num_prompt_tokens for s in states], inputs.all_greedy)
            result.draft_token_ids = {s.req_id: d for s, d in zip(states, drafts) if d}
        for s in states:
            s.draft_token_ids, s.draft_probs = [], None
        logprobs = None
        if out.logprobs is not None:  # rows of requests without drafts (those with drafts ask for none)
            firsts = [0]
            for d in drafts[:-1]:
                firsts.append(firsts[-1] + len(d) + 1)
            logprobs = [out.logprobs[i] for i in firsts]
        return SamplerOutput(tokens, logprobs), drafts, accepted

    def _forward(self, batch: PreparedBatch) -> torch.Tensor:
        """Hidden states of the batch's tokens: from the first graph runner that accepts it, else eager."""
        for graphs in self.graph_runners:
            if graphs.accepts(batch):
                return graphs.run(batch)
        ctx = ForwardContext(batch.attn, self.kv_caches, self.backend, self.cos_sin_cache)
        intermediate = None if self.stage.is_first else \
            self.stage.recv(batch.input_ids.shape[0], self.arch.hidden_size, self.dtype, self.device)
        return self.model(batch.input_ids, batch.positions, ctx, intermediate)

    def _restarts_long_rope(self, plan: StepPlan) -> bool:
        """Whether a request of this plan is recomputed for LongRoPE's long factors: its whole sequence,
        the token the pending step is sampling included, is then read on the host."""
        return self.long_rope is not None and bool(
            long_rope_restarts(self.requests, plan.num_scheduled_tokens, self.long_rope))

    def _needs_host_tokens(self, plan: StepPlan, pending: InflightStep) -> bool:
        """Whether a request of this plan with a token in flight samples with penalties, which read every
        output token on the host, or under a grammar, whose matcher must take that token before it can say
        what may come next: then the pending step is waited for first."""
        rows = pending.row_of_state
        return any(id(st) in rows and (st.params.has_penalties or st.grammar is not None)
                   for st in map(self.requests.__getitem__, plan.num_scheduled_tokens))
