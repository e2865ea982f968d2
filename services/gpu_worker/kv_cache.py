"""The paged KV cache: fixed-size blocks of K and V for every layer, in one allocation.

Per layer the cache is a (k, v) pair of [num_blocks, block_size, num_kv_heads, head_dim] views; a
request's block table maps its logical blocks to physical ones, so no request owns contiguous KV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headrace.kernels.kv_fp8 import FP8_KV_DTYPE
from headrace.services.gpu_worker.attention.base import KVCache


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The element type of the cache --kv-cache-dtype names: auto = the model's, fp8 / fp8_e4m3 = e4m3fn (one
    byte: twice the blocks in the same memory)."""
    if name == "auto":
        return model_dtype
    if name in ("fp8", "fp8_e4m3"):
        return FP8_KV_DTYPE
    raise ValueError(f"unknown KV-cache dtype {name!r}")


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype, device: torch.device) -> list[KVCache]:
    storage = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    return [(storage[i, 0], storage[i, 1]) for i in range(num_layers)]


@dataclass(frozen=True)
class KVCacheLayout:
    """Everything about one worker's KV cache but its number of blocks."""

    num_layers: int
    block_size: int
    num_kv_heads: int  # this rank's share under tensor parallelism
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype)

    def allocate(self, num_blocks: int, device: torch.device) -> list[KVCache]:
        return allocate_kv_caches(self.num_layers, num_blocks, self.block_size, self.num_kv_heads, self.head_dim,
                                  self.dtype, device)


def describe_kv_cache(layout: KVCacheLayout, num_blocks: int, kv_scales: list[tuple[float, float]]) -> str:
    """The start-up log line: blocks, tokens, bytes, element type, and for fp8 where the scales came from."""
    line = (f"KV cache: {num_blocks} blocks of {layout.block_size} tokens ({num_blocks * layout.block_size} tokens, "
            f"{num_blocks * layout.bytes_per_block / 2**30:.2f} GiB), {str(layout.dtype).removeprefix('torch.')}")
    if layout.dtype == FP8_KV_DTYPE:
        calibrated = sum(s != (1.0, 1.0) for s in kv_scales)
        line += (f", scales from the checkpoint in {calibrated} of {len(kv_scales)} layers" if calibrated else
                 ", every scale 1.0 (the checkpoint has none: values beyond +-448 saturate)")
    return line
