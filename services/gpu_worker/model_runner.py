"""The model runner: per-request state on the worker, input preparation, forward, sampling.

It receives `StepPlan`s that carry only what changed (new requests in full, running ones as ids + new
blocks), keeps each request's tokens and block table, builds one flat batch that mixes decode tokens and
prefill chunks, runs the model, computes logits only for positions that sample, and samples the batch
on the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from common.config import EngineConfig, resolve_device
from common.messages import StepPlan, StepResult
from common.sampling_params import SamplingParams
from services.gpu_worker.attention import make_backend
from services.gpu_worker.attention.base import AttentionMetadata
from services.gpu_worker.cuda_graphs import maybe_capture_decode_graphs
from services.gpu_worker.kv_cache import CPU_DEFAULT_KV_BYTES, allocate_kv_caches, kv_bytes_per_block
from services.gpu_worker.loader.model_loader import load_model, resolve_dtype
from services.gpu_worker.loader.source import ModelSource, resolve_model
from services.gpu_worker.model.arch import rope_cos_sin_cache
from services.gpu_worker.model.llama import ForwardContext
from services.gpu_worker.parallel import SINGLE, TPGroup
from services.gpu_worker.sampler import Sampler, SamplingRow, build_sampling_inputs


@dataclass
class RequestState:
    req_id: str
    token_ids: list[int]  # prompt + every token sampled so far
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    params: SamplingParams
    seed: int


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    req_order: list[str]  # batch order (decodes first)
    sample_req_ids: list[str]
    logits_indices: torch.Tensor  # flat-batch index of the last token of each sampling request


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TPGroup = SINGLE, device: str | None = None,
                 source: ModelSource | None = None, log=print):
        self.config = config
        self.device = torch.device(device or resolve_device(config.device))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.tp = tp
        self.log = log
        self.requests: dict[str, RequestState] = {}
        self.source = source or resolve_model(config.model.model, config.model.tokenizer, log=log)
        t0 = time.perf_counter()
        dtype = resolve_dtype(config.model.dtype, self.device)
        loaded = load_model(self.source, self.device, dtype, tp, seed=config.model.seed)
        self.load_seconds = time.perf_counter() - t0
        self.model, self.arch, self.hf_config, self.dtype = loaded.model, loaded.arch, loaded.hf_config, loaded.dtype
        self.eos_token_ids = self.source.eos_token_ids(self.hf_config)
        self.max_model_len = self._resolve_max_model_len()
        self.block_size = config.cache.block_size
        self.cos_sin_cache = rope_cos_sin_cache(self.hf_config, self.arch.head_dim, self.max_model_len, self.device)
        self.backend = make_backend(config.attention_backend, self.device)
        self.num_kv_heads_local = self.model.layers[0].self_attn.num_kv_heads
        self.num_blocks = self._determine_num_blocks()
        self.kv_caches = allocate_kv_caches(self.arch.num_layers, self.num_blocks, self.block_size,
                                            self.num_kv_heads_local, self.arch.head_dim, self.dtype, self.device)
        # Decode-only steps replay CUDA graphs (None: every step runs eagerly).
        self.graphs = maybe_capture_decode_graphs(config, self.model, self.backend, self.kv_caches,
                                                  self.cos_sin_cache, self.device, tp.size, self.max_model_len,
                                                  self.block_size, log=log)
        self.sampler = Sampler()

    # ------------------------------------------------------------------ sizing

    def _resolve_max_model_len(self) -> int:
        limit = self.arch.max_position_embeddings
        window = getattr(self.hf_config, "sliding_window", None)
        if window and getattr(self.hf_config, "use_sliding_window", True):
            limit = min(limit, window)  # exact full attention only inside the window
        requested = self.config.model.max_model_len
        if requested is not None and requested > limit:
            raise ValueError(f"--max-model-len {requested} exceeds the model's context length {limit}")
        return requested or limit

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
        num_tokens = min(sched.max_num_batched_tokens, self.max_model_len * sched.max_num_seqs)
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
                req_id=new.req_id,
                token_ids=list(new.prompt_token_ids) + list(new.output_token_ids),
                num_prompt_tokens=len(new.prompt_token_ids),
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                params=new.sampling_params,
                seed=new.sampling_seed,
            )
        for cached in plan.cached_requests:
            state = self.requests[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    # ------------------------------------------------------------------ input preparation

    def _prepare(self, scheduled: dict[str, int]) -> PreparedBatch:
        """One flat batch: decode requests (one token) first, then prefill chunks, in plan order."""
        decodes = [rid for rid, n in scheduled.items() if n == 1]
        prefills = [rid for rid, n in scheduled.items() if n != 1]
        order = decodes + prefills
        bs = self.block_size
        ids_parts, pos_parts, slot_parts = [], [], []
        query_lens, seq_lens, ctx_lens, sample_ids, logits_idx = [], [], [], [], []
        tables = []
        offset = 0
        for rid in order:
            state = self.requests[rid]
            n = scheduled[rid]
            start = state.num_computed_tokens
            end = start + n
            if end > len(state.token_ids):
                raise ValueError(f"request {rid}: scheduled tokens {start}..{end} past its {len(state.token_ids)} tokens")
            positions = np.arange(start, end, dtype=np.int64)
            blocks = np.asarray(state.block_ids, dtype=np.int64)
            ids_parts.append(state.token_ids[start:end])
            pos_parts.append(positions)
            slot_parts.append(blocks[positions // bs] * bs + positions % bs)
            query_lens.append(n)
            seq_lens.append(end)
            ctx_lens.append(start)
            tables.append(state.block_ids)
            offset += n
            if end == len(state.token_ids):  # the chunk reaches the newest token: sample the next one
                sample_ids.append(rid)
                logits_idx.append(offset - 1)
        max_blocks = max((len(t) for t in tables), default=1)
        table_arr = np.zeros((len(tables), max_blocks), dtype=np.int32)
        for i, t in enumerate(tables):
            table_arr[i, : len(t)] = t
        qsl = np.zeros(len(order) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=qsl[1:])
        dev = self.device
        flat_ids = [t for part in ids_parts for t in part]
        attn = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slot_parts)).to(dev, non_blocking=True),
            query_start_loc=torch.from_numpy(qsl).to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=torch.from_numpy(table_arr).to(dev, non_blocking=True),
            num_decodes=len(decodes),
            num_decode_tokens=len(decodes),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            seq_lens_host=seq_lens,
            query_lens_host=query_lens,
        )
        return PreparedBatch(
            input_ids=torch.tensor(flat_ids, dtype=torch.int64).to(dev, non_blocking=True),
            positions=torch.from_numpy(np.concatenate(pos_parts)).to(dev, non_blocking=True),
            attn=attn,
            req_order=order,
            sample_req_ids=sample_ids,
            logits_indices=torch.tensor(logits_idx, dtype=torch.int64).to(dev, non_blocking=True),
        )

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def execute(self, plan: StepPlan) -> StepResult:
        t0 = time.perf_counter()
        self._apply_plan(plan)
        result = StepResult(step_id=plan.step_id)
        if plan.is_empty:
            return result
        batch = self._prepare(plan.num_scheduled_tokens)
        if self.graphs is not None and self.graphs.accepts(batch.attn):
            hidden = self.graphs.run(batch.input_ids, batch.positions, batch.attn)
        else:
            ctx = ForwardContext(batch.attn, self.kv_caches, self.backend, self.cos_sin_cache)
            hidden = self.model(batch.input_ids, batch.positions, ctx)
        if batch.sample_req_ids:
            logits = self.model.compute_logits(hidden.index_select(0, batch.logits_indices))
            states = [self.requests[rid] for rid in batch.sample_req_ids]
            rows = [SamplingRow(s.params, s.seed, s.token_ids, s.num_prompt_tokens, self.eos_token_ids)
                    for s in states]
            inputs = build_sampling_inputs(rows, self.arch.vocab_size, self.device)
            out = self.sampler(logits, inputs)
            sampled = out.sampled_token_ids.tolist()
            for state, tok in zip(states, sampled):
                state.token_ids.append(tok)
            result.req_ids = batch.sample_req_ids
            result.sampled_token_ids = sampled
            result.logprobs = out.logprobs if out.logprobs is not None else [None] * len(sampled)
        result.execute_time = time.perf_counter() - t0
        return result
