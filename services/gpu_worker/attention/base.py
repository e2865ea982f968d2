"""The attention-backend interface and the per-step metadata every backend reads.

A step's flat batch holds the scheduled tokens of every request back to back: decode requests first
(one token each), then prefill chunks. All K/V live in the paged cache; backends read them through the
block tables, so no per-request contiguous KV exists anywhere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

# Per layer: (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim].
KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass
class AttentionMetadata:
    # [T] int64: where each token's K/V is written (block * block_size + offset); -1 = padding, skipped.
    slot_mapping: torch.Tensor
    # [S + 1] int32: start of each sequence's tokens in the flat batch.
    query_start_loc: torch.Tensor
    # [S] int32: context length after this step (cached + this step's tokens).
    seq_lens: torch.Tensor
    # [S] int32: tokens already in the cache before this step.
    context_lens: torch.Tensor
    # [S, max_blocks] int32: physical block of each logical block (padding entries are 0, never read).
    block_tables: torch.Tensor
    # The first num_decodes sequences have exactly one query token each.
    num_decodes: int
    num_decode_tokens: int
    max_query_len: int
    max_seq_len: int
    # Host copies for backends that loop on the host (the torch reference); never read on the GPU path.
    seq_lens_host: list[int] | None = None
    query_lens_host: list[int] | None = None

    def host_seq_lens(self) -> list[int]:
        """seq_lens as a host list: the host copy where the batch came with one."""
        return self.seq_lens_host if self.seq_lens_host is not None else self.seq_lens.tolist()

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes


class AttentionBackend(ABC):
    """Applies RoPE to q/k, writes k/v into the paged cache and computes causal attention, in two parts:
    `write_cache` depends on the number of tokens alone (so CUDA graphs can capture it between the GEMMs),
    `attend` reads the step's batch structure (sequence lengths, block tables). Once per step, before the
    first layer, `prepare` receives the step's metadata."""

    name: str
    # Whether a decode step's attention can be captured in a CUDA graph: no host syncs or host loops, launch
    # parameters from tensor shapes only, and nothing in `prepare` (a replayed graph does not call it).
    supports_cuda_graphs: bool

    def prepare(self, meta: AttentionMetadata) -> None:
        """Per-step work every layer would otherwise repeat, done once before the first layer of the step's
        forward; `attend` then reads this step's metadata only. Default: nothing to do."""

    @abstractmethod
    def write_cache(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim], before RoPE
        k: torch.Tensor,  # [T, num_kv_heads, head_dim], before RoPE
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        positions: torch.Tensor,  # [T] int64
        cos_sin_cache: torch.Tensor,  # [max_pos, head_dim] float32: cos | sin
        kv_cache: KVCache,
        slot_mapping: torch.Tensor,  # [T] int64; -1 = padding, not written
        kv_scale: tuple[float, float] = (1.0, 1.0),  # the layer's (k, v) scales: an fp8 cache stores x / scale
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (q, k) after RoPE (rotated in place or new tensors)
        ...

    @abstractmethod
    def attend(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim], after RoPE
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]: this step's keys after RoPE (also in the cache)
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]: this step's values (also in the cache)
        kv_cache: KVCache,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,  # the layer's sliding window: a query at p sees keys p - window + 1 .. p
        softcap: float | None = None,  # logits -> softcap * tanh(logits / softcap) before the softmax
        kv_scale: tuple[float, float] = (1.0, 1.0),  # an fp8 cache's (k, v) scales: read back as x * scale
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        ...

    def forward(self, q, k, v, positions, cos_sin_cache, kv_cache: KVCache, meta: AttentionMetadata,
                scale: float, window: int | None = None, softcap: float | None = None,
                kv_scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        """A one-layer step: prepare, RoPE + cache write, then attention over the cache."""
        self.prepare(meta)
        q, k = self.write_cache(q, k, v, positions, cos_sin_cache, kv_cache, meta.slot_mapping, kv_scale)
        return self.attend(q, k, v, kv_cache, meta, scale, window, softcap, kv_scale)

    def warm_up(self, kv_cache: KVCache, num_heads: int, max_num_seqs: int, max_query_len: int,
                softcap: float | None = None, q_dtype: torch.dtype | None = None) -> None:
        """Compile whatever this backend compiles lazily (Triton kernel variants) before serving, so no
        request pays for it. The cache's contents are scratch at this point; q_dtype is the model's activations' (None:
        the cache's, which an fp8 cache's is not). Default: nothing to do."""
