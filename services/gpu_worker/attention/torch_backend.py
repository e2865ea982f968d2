"""The `torch` attention backend: exact float32-accumulated math over the paged cache, used on CPU and as
the test oracle.

Decode sequences (one query token each) are computed together, gathering their blocks into a padded
batch; prefill chunks are computed one sequence at a time (a step holds few of them). The attention itself
is torch's scaled_dot_product_attention (fused on CPU, GQA without repeating K/V), the fastest exact
form on CPU; blocks are gathered with index_select (a row copy per block), which beats advanced
indexing at decode sizes (timings: docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from headrace.services.gpu_worker.attention.base import AttentionBackend, AttentionMetadata, KVCache


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF Llama layout) on [T, heads, head_dim], computed in float32."""
    half = cos_sin_cache.shape[1] // 2
    cs = cos_sin_cache.index_select(0, positions)
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rope on q and k as one [T, Hq + Hkv, D] tensor: half the small ops (they dominate on a CPU at
    decode sizes), the same values."""
    qk = apply_rope(torch.cat([q, k], dim=1), positions, cos_sin_cache)
    return qk[:, : q.shape[1]], qk[:, q.shape[1]:]


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V into their slots; slot -1 (padding) is skipped."""
    k_cache, v_cache = kv_cache
    num_blocks, block_size = k_cache.shape[:2]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


@dataclass
class _Gather:
    """Where `rows` sequences' first `num_tokens` keys sit in the cache: `blocks` [rows * nb] (their block
    tables' first nb entries, flattened), and the attention mask [rows, queries, num_tokens]."""
    blocks: torch.Tensor
    rows: int
    num_tokens: int
    mask: torch.Tensor


def gather_kv(kv_cache: KVCache, g: _Gather) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, num_tokens, kv_heads, head_dim] K and V, one row copy per block (index_select)."""
    k_cache, v_cache = kv_cache
    width = g.blocks.shape[0] // g.rows * k_cache.shape[1]
    k = k_cache.index_select(0, g.blocks).view(g.rows, width, *k_cache.shape[2:])[:, : g.num_tokens]
    v = v_cache.index_select(0, g.blocks).view(g.rows, width, *v_cache.shape[2:])[:, : g.num_tokens]
    return k, v


def _blocks(block_tables: torch.Tensor, num_tokens: int, block_size: int) -> torch.Tensor:
    return block_tables[:, : -(-num_tokens // block_size)].reshape(-1).long()


def plan_step(meta: AttentionMetadata, block_size: int) -> tuple[_Gather | None, list[tuple[int, int, _Gather]]]:
    """What every layer of a step gathers, built once per step: the decode rows as one padded batch, and
    (first token, query tokens, gather) per prefill chunk."""
    nd = meta.num_decodes
    seq_lens = meta.seq_lens_host if meta.seq_lens_host is not None else meta.seq_lens.tolist()
    query_lens = meta.query_lens_host if meta.query_lens_host is not None else \
        (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).tolist()
    decode = None
    if nd:
        max_len = max(seq_lens[:nd])
        lens = meta.seq_lens[:nd].to(meta.block_tables.device)
        mask = (torch.arange(max_len, device=lens.device)[None, :] < lens[:, None])[:, None, :]
        decode = _Gather(_blocks(meta.block_tables[:nd], max_len, block_size), nd, max_len, mask)
    prefills = []
    start = meta.num_decode_tokens
    for i in range(nd, meta.num_seqs):
        n, total = query_lens[i], seq_lens[i]
        qpos = torch.arange(total - n, total, device=meta.block_tables.device)
        mask = torch.arange(total, device=qpos.device)[None, :] <= qpos[:, None]
        prefills.append((start, n, _Gather(_blocks(meta.block_tables[i : i + 1], total, block_size), 1, total,
                                           mask[None])))
        start += n
    return decode, prefills


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [S, Q, H, D], k/v [S, L, Hkv, D], mask [S, Q, L] (True = attend) -> [S, Q, H, D]; GQA by grouping.
    A query row with no visible key comes out as zeros. Computed in float32 whatever the cache dtype (as the
    reference; the fused kernels keep reduced-precision probabilities in bf16/fp16)."""
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                         v.float().transpose(1, 2), attn_mask=mask[:, None], scale=scale,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2).nan_to_num(0.0).to(q.dtype)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    supports_cuda_graphs = False  # loops over prefill sequences on the host

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size  # of the KV caches it attends over
        # The step's gathers and masks, the same for every layer: built once per step by `prepare`.
        self._meta: AttentionMetadata | None = None
        self._plan: tuple[_Gather | None, list[tuple[int, int, _Gather]]] | None = None

    def prepare(self, meta: AttentionMetadata) -> None:
        self._meta, self._plan = meta, plan_step(meta, self.block_size)

    def write_cache(self, q, k, v, positions, cos_sin_cache, kv_cache, slot_mapping):
        q, k = apply_rope_qk(q, k, positions, cos_sin_cache)
        write_kv(k, v, kv_cache, slot_mapping)
        return q, k

    def attend(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float):
        assert self._meta is meta, "prepare(meta) comes once per step, before the first layer"
        assert kv_cache[0].shape[1] == self.block_size, "a KV cache of another block size"
        decode, prefills = self._plan
        out = torch.empty_like(q)
        if decode is not None:
            kd, vd = gather_kv(kv_cache, decode)
            out[: decode.rows] = attend(q[: decode.rows, None], kd, vd, decode.mask, scale)[:, 0]
        for start, n, g in prefills:
            ks, vs = gather_kv(kv_cache, g)
            out[start : start + n] = attend(q[None, start : start + n], ks, vs, g.mask, scale)[0]
        return out
