"""The model runner: per-request state on the worker, input preparation, forward, sampling.

It receives `StepPlan`s that carry only what changed (new requests in full, running ones as ids + new
blocks), keeps each request's tokens and block table, builds one flat batch that mixes decode tokens and
prefill chunks, runs the model, computes logits only for positions that sample, and samples the batch
on the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from headrace.common.config import EngineConfig, resolve_device
from headrace.common.messages import StepPlan, StepResult
from headrace.common.sampling_params import SamplingParams
from headrace.services.gpu_worker.attention import make_backend
from headrace.services.gpu_worker.attention.base import AttentionMetadata
from headrace.services.gpu_worker.cuda_graphs import maybe_capture_decode_graphs
from headrace.services.gpu_worker.kv_cache import CPU_DEFAULT_KV_BYTES, allocate_kv_caches, kv_bytes_per_block
from headrace.services.gpu_worker.loader.model_loader import load_model, resolve_dtype
from headrace.services.gpu_worker.model.rope import rope_cos_sin_cache
from headrace.services.gpu_worker.model.llama import ForwardContext
from headrace.services.gpu_worker.parallel import SINGLE, TPGroup
from headrace.services.gpu_worker.piecewise_graphs import PiecewiseGraphs, maybe_capture_piecewise_graphs
from headrace.services.gpu_worker.sampler import Sampler, SamplingRow, build_sampling_inputs


class RequestState:
    """What the worker keeps per request between steps; the block table lives in a growable numpy row so a
    step's batch table is assembled with array copies, not Python loops over block ids."""

    __slots__ = ("req_id", "token_ids", "num_prompt_tokens", "block_table", "num_blocks", "num_computed_tokens",
                 "params", "seed")

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
        self.add_blocks(block_ids)

    def add_blocks(self, block_ids: list[int]) -> None:
        end = self.num_blocks + len(block_ids)
        if end > len(self.block_table):
            grown = np.zeros(2 * end, dtype=np.int32)
            grown[: self.num_blocks] = self.block_table[: self.num_blocks]
            self.block_table = grown
        self.block_table[self.num_blocks : end] = block_ids
        self.num_blocks = end


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    req_order: list[str]  # batch order (decodes first)
    sample_req_ids: list[str]
    logits_indices: torch.Tensor  # flat-batch index of the last token of each sampling request
    sample_states: list[RequestState] = field(default_factory=list)  # parallel to sample_req_ids


@dataclass
class InflightStep:
    """A launched step. Its sampled ids stay on the device until `_resolve` copies them to the host and
    appends them to the requests' token lists; until then the next step's decodes read them from `sampled`.
    States are held by object, not id: a request aborted and re-added under the same id is a new state."""

    result: StepResult
    t0: float
    states: list[RequestState] = field(default_factory=list)
    row_of_state: dict[int, int] = field(default_factory=dict)  # id(state) -> row of `sampled`
    sampled: torch.Tensor | None = None  # [n] int64 on the device
    host: torch.Tensor | None = None  # [n] int64, pinned; valid once `event` has completed
    event: torch.cuda.Event | None = None
    resolved: bool = False

    def done(self) -> bool:
        """Whether finishing it would not block."""
        return self.resolved or self.event is None or self.event.query()


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TPGroup = SINGLE, device: str | None = None,
                 log=print):
        resolved = config.require_resolved()
        self.config = config
        self.device = torch.device(device or resolve_device(config.device))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.tp = tp
        self.log = log
        self.requests: dict[str, RequestState] = {}
        t0 = time.perf_counter()
        dtype = resolve_dtype(config.model.dtype, self.device)
        loaded = load_model(resolved, self.device, dtype, tp, seed=config.model.seed)
        self.load_seconds = time.perf_counter() - t0
        self.model, self.arch, self.hf_config, self.dtype = loaded.model, loaded.arch, loaded.hf_config, loaded.dtype
        self.eos_token_ids = resolved.eos_token_ids
        self.max_model_len = resolved.max_model_len
        self.block_size = config.cache.block_size
        self.cos_sin_cache = rope_cos_sin_cache(self.hf_config, self.arch.head_dim, self.max_model_len, self.device)
        self.backend = make_backend(config.attention_backend, self.device)
        self.num_kv_heads_local = self.model.layers[0].self_attn.num_kv_heads
        self.num_blocks = self._determine_num_blocks()
        self.kv_caches = allocate_kv_caches(self.arch.num_layers, self.num_blocks, self.block_size,
                                            self.num_kv_heads_local, self.arch.head_dim, self.dtype, self.device)
        if self.device.type == "cuda":
            sched = config.scheduler
            self.backend.warm_up(self.kv_caches[0], self.model.layers[0].self_attn.num_heads, sched.max_num_seqs,
                                 min(sched.token_budget, self.max_model_len))
        # Decode-only steps replay CUDA graphs (None: every step runs eagerly).
        self.graphs = maybe_capture_decode_graphs(config, self.model, self.backend, self.kv_caches,
                                                  self.cos_sin_cache, self.device, tp.size, self.max_model_len,
                                                  self.block_size, log=log)
        # Other steps up to a token ladder's top replay everything but attention from piecewise graphs.
        self.piecewise: PiecewiseGraphs | None = maybe_capture_piecewise_graphs(
            config, self.model, self.backend, self.kv_caches, self.cos_sin_cache, self.device, tp.size, log=log)
        self.sampler = Sampler()
        if self.device.type == "cuda":
            self.sampler.warm_up(self.arch.vocab_size, config.scheduler.max_num_seqs, self.device)
        self._launched: list[InflightStep] = []  # launched and not yet finished, oldest first

    # ------------------------------------------------------------------ sizing

    def _determine_num_blocks(self) -> int:
        cache = self.config.cache
        per_block = kv_bytes_per_block(self.arch.num_layers, self.block_size, self.num_kv_heads_local,
                                       self.arch.head_dim, self.dtype)
        if cache.num_blocks is not None:
            num_blocks = cache.num_blocks
        elif self.device.type == "cpu":
            num_blocks = (cache.kv_cache_memory or CPU_DEFAULT_KV_BYTES) // per_block
        else:
            num_blocks = self._profile_gpu_blocks(per_block)
        blocks_per_seq = -(-self.max_model_len // self.block_size)
        if num_blocks < blocks_per_seq:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {self.block_size} tokens "
                f"({num_blocks * self.block_size} tokens) but --max-model-len {self.max_model_len} needs "
                f"{blocks_per_seq}: raise --kv-cache-memory / --gpu-memory-utilization or lower --max-model-len")
        return int(num_blocks)

    @torch.no_grad()
    def _profile_gpu_blocks(self, per_block: int) -> int:
        """Blocks that fit in total memory x utilization after the weights and a peak-size forward."""
        sched = self.config.scheduler
        num_tokens = min(sched.token_budget, self.max_model_len * sched.max_num_seqs)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        seq_len = min(num_tokens, self.max_model_len)
        lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        probe_blocks = sum(-(-n // self.block_size) for n in lens)
        caches = allocate_kv_caches(self.arch.num_layers, probe_blocks, self.block_size, self.num_kv_heads_local,
                                    self.arch.head_dim, self.dtype, self.device)
        states = []
        next_block = 0
        for i, n in enumerate(lens):
            nb = -(-n // self.block_size)
            states.append((f"profile-{i}", n, list(range(next_block, next_block + nb))))
            next_block += nb
        batch = self._build_profile_batch(states)
        ctx = ForwardContext(batch.attn, caches, self.backend, self.cos_sin_cache)
        hidden = self.model(batch.input_ids, batch.positions, ctx)
        self.model.compute_logits(hidden[-sched.max_num_seqs:])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - probe_blocks * per_block
        del caches, hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.config.cache.gpu_memory_utilization - used_by_others - peak
        if self.config.cache.kv_cache_memory is not None:
            budget = min(budget, self.config.cache.kv_cache_memory)
        self.log(f"GPU memory: weights+activations peak {peak / 2**30:.2f} GiB, KV budget {budget / 2**30:.2f} GiB")
        return max(int(budget // per_block), 0)

    def _build_profile_batch(self, states: list[tuple[str, int, list[int]]]) -> PreparedBatch:
        saved = self.requests
        self.requests = {
            rid: RequestState(rid, [0] * n, n, blocks, 0, SamplingParams(max_tokens=1), 0)
            for rid, n, blocks in states
        }
        try:
            return self._prepare({rid: n for rid, n, _ in states})
        finally:
            self.requests = saved

    # ------------------------------------------------------------------ state updates

    def _apply_plan(self, plan: StepPlan) -> None:
        for rid in plan.finished_req_ids:
            self.requests.pop(rid, None)
        for rid in plan.preempted_req_ids:
            self.requests.pop(rid, None)
        for new in plan.new_requests:
            self.requests[new.req_id] = RequestState(
                new.req_id, list(new.prompt_token_ids) + list(new.output_token_ids), len(new.prompt_token_ids),
                new.block_ids, new.num_computed_tokens, new.sampling_params, new.sampling_seed)
        for cached in plan.cached_requests:
            state = self.requests[cached.req_id]
            if cached.new_block_ids:
                state.add_blocks(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    # ------------------------------------------------------------------ input preparation

    def _prepare(self, scheduled: dict[str, int], pending: InflightStep | None = None) -> PreparedBatch:
        """One flat batch: decode requests (one token) first, then prefill chunks, in plan order. Per-request
        Python work is one token lookup (decodes) or one slice (prefills) plus one table-row copy; positions,
        slots and lengths are computed as arrays.

        `pending` is the step still running on the device: a decode whose input is the token that step is
        sampling reads it from that step's device tensor (an index_copy_ into the input ids), so this step
        launches before that one ends."""
        decodes = [rid for rid, n in scheduled.items() if n == 1]
        prefills = [rid for rid, n in scheduled.items() if n != 1]
        order = decodes + prefills
        states = [self.requests[rid] for rid in order]
        num_seqs, nd = len(order), len(decodes)
        starts = np.fromiter((st.num_computed_tokens for st in states), np.int64, num_seqs)
        counts = np.fromiter((scheduled[rid] for rid in order), np.int64, num_seqs)
        known = np.fromiter((len(st.token_ids) for st in states), np.int64, num_seqs)
        pending_rows = pending.row_of_state if pending is not None else {}
        if pending_rows:
            known += np.fromiter((id(st) in pending_rows for st in states), np.int64, num_seqs)
        ends = starts + counts
        if (ends > known).any():
            i = int(np.argmax(ends > known))
            raise ValueError(f"request {order[i]}: scheduled tokens {starts[i]}..{ends[i]} past its {known[i]} tokens")
        fill_pos: list[int] = []
        fill_rows: list[int] = []
        flat_ids = []
        for i, (st, p) in enumerate(zip(states[:nd], starts[:nd].tolist())):
            if p < len(st.token_ids):
                flat_ids.append(st.token_ids[p])
            else:  # the token the running step is sampling: taken from the device below
                flat_ids.append(0)
                fill_pos.append(i)
                fill_rows.append(pending_rows[id(st)])
        for st, a, b in zip(states[nd:], starts[nd:].tolist(), ends[nd:].tolist()):
            flat_ids.extend(st.token_ids[a:b])
        # positions of every token: decodes are their start; prefills an arange each
        if num_seqs > nd:
            positions = np.concatenate([starts[:nd]] + [np.arange(a, b) for a, b in zip(starts[nd:], ends[nd:])])
        else:
            positions = starts
        max_blocks = max(st.num_blocks for st in states)
        table = np.zeros((num_seqs, max_blocks), dtype=np.int32)
        for i, st in enumerate(states):
            table[i, : st.num_blocks] = st.block_table[: st.num_blocks]
        bs = self.block_size
        seq_of_token = np.repeat(np.arange(num_seqs), counts)
        slots = table[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        qsl = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(counts, out=qsl[1:])
        samples = ends == known  # the chunk reaches the newest token: sample the next one
        sample_ids = [rid for rid, yes in zip(order, samples.tolist()) if yes]
        seq_lens = ends.astype(np.int32)
        logits_indices = qsl[1:][samples].astype(np.int64) - 1
        # Two host-to-device copies per step (one per dtype) from pinned staging buffers: a copy from
        # pageable memory may wait for the device, which would serialise the host with the running step.
        (input_ids, pos_t, slot_t, logit_t, fill_pos_t, fill_rows_t), (qsl_t, seq_t, ctx_t, table_t) = (
            self._upload([np.asarray(flat_ids, dtype=np.int64), positions, slots, logits_indices,
                          np.asarray(fill_pos, dtype=np.int64), np.asarray(fill_rows, dtype=np.int64)], np.int64),
            self._upload([qsl, seq_lens, starts.astype(np.int32), table.reshape(-1)], np.int32))
        if fill_pos:
            assert pending is not None and pending.sampled is not None
            input_ids.index_copy_(0, fill_pos_t, pending.sampled.index_select(0, fill_rows_t))
        attn = AttentionMetadata(
            slot_mapping=slot_t,
            query_start_loc=qsl_t,
            seq_lens=seq_t,
            context_lens=ctx_t,
            block_tables=table_t.view(num_seqs, max_blocks),
            num_decodes=nd,
            num_decode_tokens=nd,
            max_query_len=int(counts.max()),
            max_seq_len=int(ends.max()),
            seq_lens_host=seq_lens.tolist(),
            query_lens_host=counts.tolist(),
        )
        return PreparedBatch(
            input_ids=input_ids,
            positions=pos_t,
            attn=attn,
            req_order=order,
            sample_req_ids=sample_ids,
            logits_indices=logit_t,
            sample_states=[st for st, yes in zip(states, samples.tolist()) if yes],
        )

    def _upload(self, arrays: list[np.ndarray], dtype: type) -> list[torch.Tensor]:
        """Pack same-dtype host arrays into one (pinned, on CUDA) buffer, copy it to the device without
        blocking, and return per-array views of the device copy.

        Every array starts on a 16-byte boundary: Triton compiles one kernel variant per pointer alignment
        class, so views at offsets that vary from step to step would compile new variants mid-serving
        (about a second each, every request waiting)."""
        itemsize = 8 if dtype is np.int64 else 4
        per_16 = 16 // itemsize
        sizes = [a.size for a in arrays]
        starts, total = [], 0
        for n in sizes:
            starts.append(total)
            total += -(-n // per_16) * per_16
        tdtype = torch.int64 if dtype is np.int64 else torch.int32
        cuda = self.device.type == "cuda"
        host = torch.empty(max(total, 1), dtype=tdtype, pin_memory=cuda)
        packed = host.numpy()
        for a, start, n in zip(arrays, starts, sizes):
            packed[start : start + n] = a
        dev = host.to(self.device, non_blocking=True) if cuda else host
        return [dev[start : start + n] for start, n in zip(starts, sizes)]

    # ------------------------------------------------------------------ the step

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step and wait for its tokens."""
        return self.finish(self.launch(plan))

    @torch.no_grad()
    def launch(self, plan: StepPlan) -> InflightStep:
        """Apply the plan and queue its forward and sampling on the device without waiting for them.

        At most one launched step stays unresolved (its tokens not yet on the host): the one this step may
        read decode inputs from. Steps must be finished in launch order."""
        t0 = time.perf_counter()
        for older in self._launched[:-1]:
            self._resolve(older)
        pending = self._launched[-1] if self._launched and not self._launched[-1].resolved else None
        self._apply_plan(plan)
        step = InflightStep(StepResult(step_id=plan.step_id), t0)
        self._launched.append(step)
        if plan.is_empty:
            step.resolved = True
            return step
        if pending is not None and self._needs_host_tokens(plan, pending):
            self._resolve(pending)
            pending = None
        batch = self._prepare(plan.num_scheduled_tokens, pending)
        if self.graphs is not None and self.graphs.accepts(batch.attn):
            hidden = self.graphs.run(batch.input_ids, batch.positions, batch.attn)
        elif self.piecewise is not None and self.piecewise.accepts(batch.input_ids.shape[0]):
            hidden = self.piecewise.run(batch.input_ids, batch.positions, batch.attn)
        else:
            ctx = ForwardContext(batch.attn, self.kv_caches, self.backend, self.cos_sin_cache)
            hidden = self.model(batch.input_ids, batch.positions, ctx)
        if batch.sample_req_ids:
            logits = self.model.compute_logits(hidden.index_select(0, batch.logits_indices))
            pending_rows = pending.row_of_state if pending is not None else {}
            rows = [SamplingRow(s.params, s.seed, s.token_ids, s.num_prompt_tokens, self.eos_token_ids,
                                1 if id(s) in pending_rows else 0) for s in batch.sample_states]
            inputs = build_sampling_inputs(rows, self.arch.vocab_size, self.device)
            out = self.sampler(logits, inputs)
            step.states = batch.sample_states
            step.row_of_state = {id(s): i for i, s in enumerate(batch.sample_states)}
            step.sampled = out.sampled_token_ids
            step.result.req_ids = batch.sample_req_ids
            step.result.logprobs = out.logprobs if out.logprobs is not None else [None] * len(rows)
            if self.device.type == "cuda":
                step.host = torch.empty(len(rows), dtype=torch.int64, pin_memory=True)
                step.host.copy_(out.sampled_token_ids, non_blocking=True)
                step.event = torch.cuda.Event()
                step.event.record()
            else:
                step.host = out.sampled_token_ids
        else:
            step.resolved = True
        return step

    def finish(self, step: InflightStep) -> StepResult:
        """Wait for a launched step (the oldest not yet finished) and return its result."""
        assert self._launched and self._launched[0] is step, "steps are finished in launch order"
        self._launched.pop(0)
        self._resolve(step)
        step.result.execute_time = time.perf_counter() - step.t0
        return step.result

    def _resolve(self, step: InflightStep) -> None:
        """Bring a step's sampled tokens to the host and append them to their requests."""
        if step.resolved:
            return
        if step.event is not None:
            step.event.synchronize()
        sampled = step.host.tolist()
        for state, tok in zip(step.states, sampled):
            state.token_ids.append(tok)
        step.result.sampled_token_ids = sampled
        step.resolved = True
        step.sampled = None  # free the device tensor; later steps no longer read from it

    def _needs_host_tokens(self, plan: StepPlan, pending: InflightStep) -> bool:
        """Whether a request of this plan with a token in flight samples with penalties, which read every
        output token on the host: then the pending step is waited for first."""
        rows = pending.row_of_state
        return any(id(st) in rows and st.params.has_penalties
                   for st in map(self.requests.__getitem__, plan.num_scheduled_tokens))

    def abandon(self) -> None:
        """Forget every launched step (after a failure: the caller resets the request state)."""
        self._launched.clear()
