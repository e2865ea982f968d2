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
                new.req_id, list(new.prompt_token_ids) + list(new.output_token_ids), len(new.prompt_token_ids),
                new.block_ids, new.num_computed_tokens, new.sampling_params, new.sampling_seed)
        for cached in plan.cached_requests:
            state = self.requests[cached.req_id]
            if cached.new_block_ids:
                state.add_blocks(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    # ------------------------------------------------------------------ input preparation

    def _prepare(self, scheduled: dict[str, int]) -> PreparedBatch:
        """One flat batch: decode requests (one token) first, then prefill chunks, in plan order. Per-request
        Python work is one token lookup (decodes) or one slice (prefills) plus one table-row copy; positions,
        slots and lengths are computed as arrays."""
        decodes = [rid for rid, n in scheduled.items() if n == 1]
        prefills = [rid for rid, n in scheduled.items() if n != 1]
        order = decodes + prefills
        states = [self.requests[rid] for rid in order]
        num_seqs, nd = len(order), len(decodes)
        starts = np.fromiter((st.num_computed_tokens for st in states), np.int64, num_seqs)
        counts = np.fromiter((scheduled[rid] for rid in order), np.int64, num_seqs)
        known = np.fromiter((len(st.token_ids) for st in states), np.int64, num_seqs)
        ends = starts + counts
        if (ends > known).any():
            i = int(np.argmax(ends > known))
            raise ValueError(f"request {order[i]}: scheduled tokens {starts[i]}..{ends[i]} past its {known[i]} tokens")
        flat_ids = [st.token_ids[p] for st, p in zip(states[:nd], starts[:nd].tolist())]
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
        dev = self.device
        seq_lens = ends.astype(np.int32)
        attn = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev, non_blocking=True),
            query_start_loc=torch.from_numpy(qsl).to(dev, non_blocking=True),
            seq_lens=torch.from_numpy(seq_lens).to(dev, non_blocking=True),
            context_lens=torch.from_numpy(starts.astype(np.int32)).to(dev, non_blocking=True),
            block_tables=torch.from_numpy(table).to(dev, non_blocking=True),
            num_decodes=nd,
            num_decode_tokens=nd,
            max_query_len=int(counts.max()),
            max_seq_len=int(ends.max()),
            seq_lens_host=seq_lens.tolist(),
            query_lens_host=counts.tolist(),
        )
        return PreparedBatch(
            input_ids=torch.tensor(flat_ids, dtype=torch.int64).to(dev, non_blocking=True),
            positions=torch.from_numpy(positions).to(dev, non_blocking=True),
            attn=attn,
            req_order=order,
            sample_req_ids=sample_ids,
            logits_indices=torch.from_numpy(qsl[1:][samples].astype(np.int64) - 1).to(dev, non_blocking=True),
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
