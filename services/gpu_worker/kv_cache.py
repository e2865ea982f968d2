"""The paged KV cache: fixed-size blocks of K and V for every layer, in one allocation.

Per layer the cache is a (k, v) pair of [num_blocks, block_size, num_kv_heads, head_dim] views; a
request's block table maps its logical blocks to physical ones, so no request owns contiguous KV.
"""

from __future__ import annotations

import torch

from headrace.services.gpu_worker.attention.base import KVCache

CPU_DEFAULT_KV_BYTES = 1 << 30


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype, device: torch.device) -> list[KVCache]:
    storage = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    return [(storage[i, 0], storage[i, 1]) for i in range(num_layers)]
