"""The `torch` attention backend: exact math over the paged cache, used on CPU and as the test oracle.

Decode sequences (one query token each) are computed together, gathering their blocks into a padded
batch; prefill chunks are computed one sequence at a time (a step holds few of them).
"""

from __future__ import annotations

import torch

from services.gpu_worker.attention.base import AttentionBackend, AttentionMetadata, KVCache


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF Llama layout) on [T, heads, head_dim], computed in float32."""
    half = cos_sin_cache.shape[1] // 2
    cs = cos_sin_cache.index_select(0, positions)
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V into their slots; slot -1 (padding) is skipped."""
    k_cache, v_cache = kv_cache
    num_blocks, block_size = k_cache.shape[:2]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(kv_cache: KVCache, block_tables: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[S, num_tokens, kv_heads, head_dim] K and V read through block tables ([S, >= ceil(n/bs)])."""
    k_cache, v_cache = kv_cache
    block_size = k_cache.shape[1]
    nb = -(-num_tokens // block_size)
    tables = block_tables[:, :nb].long()
    s = tables.shape[0]
    k = k_cache[tables].reshape(s, nb * block_size, *k_cache.shape[2:])[:, :num_tokens]
    v = v_cache[tables].reshape(s, nb * block_size, *v_cache.shape[2:])[:, :num_tokens]
    return k, v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [S, Q, H, D], k/v [S, L, Hkv, D], mask [S, Q, L] (True = attend) -> [S, Q, H, D]; GQA by grouping."""
    s, nq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.float().view(s, nq, hkv, h // hkv, d)
    scores = torch.einsum("sqhgd,slhd->shgql", qg, k.float()) * scale
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no keys attends to nothing
    out = torch.einsum("shgql,slhd->sqhgd", probs, v.float())
    return out.reshape(s, nq, h, d).to(q.dtype)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def write_cache(self, q, k, v, positions, cos_sin_cache, kv_cache, slot_mapping):
        q = apply_rope(q, positions, cos_sin_cache)
        k = apply_rope(k, positions, cos_sin_cache)
        write_kv(k, v, kv_cache, slot_mapping)
        return q, k

    def attend(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float):
        out = torch.empty_like(q)
        nd = meta.num_decodes
        seq_lens = meta.seq_lens_host if meta.seq_lens_host is not None else meta.seq_lens.tolist()
        query_lens = meta.query_lens_host if meta.query_lens_host is not None else \
            (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).tolist()
        if nd:
            max_len = max(seq_lens[:nd])
            kd, vd = gather_kv(kv_cache, meta.block_tables[:nd], max_len)
            lens = meta.seq_lens[:nd].to(kd.device)
            mask = (torch.arange(max_len, device=kd.device)[None, :] < lens[:, None])[:, None, :]
            out[:nd] = attend(q[:nd, None], kd, vd, mask, scale)[:, 0]
        start = meta.num_decode_tokens
        for i in range(nd, meta.num_seqs):
            n, total = query_lens[i], seq_lens[i]
            ks, vs = gather_kv(kv_cache, meta.block_tables[i : i + 1], total)
            qpos = torch.arange(total - n, total, device=q.device)
            mask = torch.arange(total, device=q.device)[None, :] <= qpos[:, None]
            out[start : start + n] = attend(q[None, start : start + n], ks, vs, mask[None], scale)[0]
            start += n
        return out
