"""How many KV-cache blocks a worker allocates: the count the config gives, a byte budget on a CPU, or on a
GPU what fits in its memory share after the weights and a forward over the largest possible step."""

from __future__ import annotations

import torch

from headrace.common.config import CacheConfig, EngineConfig, SchedulerConfig
from headrace.common.sampling_params import SamplingParams
from headrace.services.gpu_worker.attention.base import AttentionBackend
from headrace.services.gpu_worker.batch_inputs import prepare_batch
from headrace.services.gpu_worker.kv_cache import KVCacheLayout
from headrace.services.gpu_worker.model.llama import ForwardContext, LlamaForCausalLM
from headrace.services.gpu_worker.request_state import RequestState

CPU_DEFAULT_KV_BYTES = 1 << 30


def configured_num_blocks(cache: CacheConfig, layout: KVCacheLayout, device: torch.device) -> int | None:
    """The block count the config fixes (explicitly, or on a CPU by a byte budget); None: profile the GPU."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    if device.type == "cpu":
        return (cache.kv_cache_memory or CPU_DEFAULT_KV_BYTES) // layout.bytes_per_block
    return None


def check_holds_one_sequence(num_blocks: int, block_size: int, max_model_len: int) -> int:
    """num_blocks as an int; raises if one sequence of max_model_len tokens would not fit."""
    blocks_per_seq = -(-max_model_len // block_size)
    if num_blocks < blocks_per_seq:
        raise ValueError(
            f"the KV cache holds {num_blocks} blocks of {block_size} tokens "
            f"({num_blocks * block_size} tokens) but --max-model-len {max_model_len} needs "
            f"{blocks_per_seq}: raise --kv-cache-memory / --gpu-memory-utilization or lower --max-model-len")
    return int(num_blocks)


def profile_gpu_num_blocks(model: LlamaForCausalLM, backend: AttentionBackend, cos_sin_cache: torch.Tensor,
                           layout: KVCacheLayout, config: EngineConfig, max_model_len: int, device: torch.device,
                           log=print) -> int:
    """Blocks that fit in total memory x utilization after the weights and a peak-size forward."""
    peak = peak_forward_bytes(model, backend, cos_sin_cache, layout, config.scheduler, max_model_len, device)
    budget = kv_budget_bytes(config.cache, peak, device)
    log(f"GPU memory: weights+activations peak {peak / 2**30:.2f} GiB, KV budget {budget / 2**30:.2f} GiB")
    return max(int(budget // layout.bytes_per_block), 0)


@torch.no_grad()
def peak_forward_bytes(model: LlamaForCausalLM, backend: AttentionBackend, cos_sin_cache: torch.Tensor,
                       layout: KVCacheLayout, sched: SchedulerConfig, max_model_len: int,
                       device: torch.device) -> int:
    """Peak device memory of the weights and a forward over the largest step the scheduler can plan (logits
    for max_num_seqs rows), less the probe KV cache that forward writes into."""
    num_tokens = min(sched.token_budget, max_model_len * sched.max_num_seqs)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    requests = profile_requests(num_tokens, max_model_len, layout.block_size)
    probe_blocks = sum(st.num_blocks for st in requests.values())
    caches = layout.allocate(probe_blocks, device)
    scheduled = {rid: st.num_prompt_tokens for rid, st in requests.items()}
    batch = prepare_batch(requests, scheduled, layout.block_size, device)
    ctx = ForwardContext(batch.attn, caches, backend, cos_sin_cache)
    hidden = model(batch.input_ids, batch.positions, ctx)
    if model.is_last_stage:  # a pipeline stage before the last has no LM head
        model.compute_logits(hidden[-sched.max_num_seqs:])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - probe_blocks * layout.bytes_per_block
    del caches, hidden
    torch.cuda.empty_cache()
    return peak


def profile_requests(num_tokens: int, max_model_len: int, block_size: int) -> dict[str, RequestState]:
    """num_tokens of prompt in sequences of up to max_model_len, each on its own consecutive blocks."""
    seq_len = min(num_tokens, max_model_len)
    lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
    requests = {}
    next_block = 0
    for i, n in enumerate(lens):
        nb = -(-n // block_size)
        rid = f"profile-{i}"
        requests[rid] = RequestState(rid, [0] * n, n, list(range(next_block, next_block + nb)), 0,
                                     SamplingParams(max_tokens=1), 0)
        next_block += nb
    return requests


def kv_budget_bytes(cache: CacheConfig, peak: int, device: torch.device) -> float:
    """Bytes left for the KV cache in this process's share of the device (other processes' use counted)."""
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    budget = total * cache.gpu_memory_utilization - used_by_others - peak
    if cache.kv_cache_memory is not None:
        budget = min(budget, cache.kv_cache_memory)
    return budget
