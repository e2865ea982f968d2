"""The `torch` attention backend: exact float32-accumulated math over the paged cache, used on CPU and as
the test oracle.

Decode sequences (one query token each) are computed together, gathering their blocks into a padded
batch; prefill chunks are computed one sequence at a time (a step holds few of them). The attention itself
is torch's scaled_dot_product_attention (fused on CPU, GQA without repeating K/V), the fastest exact
form on CPU; blocks are gathered with index_select (a row copy per block), which beats advanced
indexing at decode sizes (timings: docs/benchmarks.md). A windowed layer gathers from each row's first
block inside its window and masks the rest of the window's edge; soft-capped logits (Gemma 2) are written
out, as SDPA cannot cap them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from headrace.kernels.kv_fp8 import dequantize_kv, is_fp8, quantize_kv, store_dtype_view
from headrace.services.gpu_worker.attention.base import AttentionBackend, AttentionMetadata, KVCache


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF Llama layout) on [T, heads, head_dim], computed in float32."""
    return rotate(x, cos_sin_cache.index_select(0, positions))


def rotate(x: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """apply_rope given the table's rows at the tokens' positions, cs [T, head_dim] (cos | sin)."""
    return rotate_by(x, *rope_factors(cs))


def rope_factors(cs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos | cos) and (-sin | sin), [T, 1, head_dim] float32, from the table's rows cs [T, head_dim]: what
    rotate_by multiplies by, built once per step rather than sliced in every layer."""
    half = cs.shape[1] // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def rotate_by(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """x * (cos | cos) + (x2 | x1) * (-sin | sin) in float32: rotate-half RoPE, i.e. x1 cos - x2 sin and
    x2 cos + x1 sin bit for bit (a - b is a + (-b) in IEEE), in five operators where the halves took twelve."""
    xf = x.float()
    out = xf * cos2
    out += xf.roll(cos2.shape[-1] // 2, dims=-1).mul_(sin2)
    return out.to(x.dtype)


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """rotate q and k as one [T, Hq + Hkv, D] tensor: half the small ops (they dominate on a CPU at decode
    sizes), the same values. factors: rope_factors of the table's rows at the tokens' positions."""
    qk = rotate_by(torch.cat([q, k], dim=1), *factors)
    return qk[:, : q.shape[1]], qk[:, q.shape[1]:]


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor,
             kv_scale: tuple[float, float] = (1.0, 1.0), all_valid: bool | None = None) -> None:
    """Scatter this step's K/V into their slots; slot -1 (padding) is skipped. An fp8 cache stores K / k_scale
    and V / v_scale (kernels/kv_fp8.py). `all_valid`: whether no slot is -1, when the caller knows."""
    k_cache, v_cache = kv_cache
    num_blocks, block_size = k_cache.shape[:2]
    if all_valid is None:
        all_valid = bool((slot_mapping >= 0).all())
    if not all_valid:
        valid = slot_mapping >= 0
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    if is_fp8(k_cache.dtype):
        k, v = quantize_kv(k, kv_scale[0]), quantize_kv(v, kv_scale[1])
    for x, cache in ((k, k_cache), (v, v_cache)):
        rows = store_dtype_view(cache).view(num_blocks * block_size, *cache.shape[2:])
        rows.index_copy_(0, slot_mapping, store_dtype_view(x.to(cache.dtype)))


@dataclass
class KVGather:
    """Where `rows` sequences' first `num_tokens` keys sit in the cache: `blocks` [rows * nb] (their block
    tables' first nb entries, flattened), and the attention mask [rows, queries, num_tokens] (None: every
    query sees every key, as decode rows of one length do; SDPA then skips building and applying a mask,
    measured ~7 us of ~30 per layer at batch 1)."""
    blocks: torch.Tensor
    rows: int
    num_tokens: int
    mask: torch.Tensor | None


def gather_kv(kv_cache: KVCache, g: KVGather, kv_scale: tuple[float, float] = (1.0, 1.0)
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, num_tokens, kv_heads, head_dim] K and V, one row copy per block (index_select); an fp8 cache's
    dequantized to float32 (element times its scale)."""
    k_cache, v_cache = kv_cache
    width = g.blocks.shape[0] // g.rows * k_cache.shape[1]
    k = k_cache.index_select(0, g.blocks).view(g.rows, width, *k_cache.shape[2:])[:, : g.num_tokens]
    v = v_cache.index_select(0, g.blocks).view(g.rows, width, *v_cache.shape[2:])[:, : g.num_tokens]
    if is_fp8(k_cache.dtype):
        return dequantize_kv(k, kv_scale[0]), dequantize_kv(v, kv_scale[1])
    return k, v


def _decode_gather(meta: AttentionMetadata, seq_lens: list[int], block_size: int, window: int | None) -> KVGather:
    """The decode rows as one padded batch. With a window each row starts at its first block inside the
    window (blocks wholly before it are not read); columns past a row's end, or before its window, are
    masked."""
    nd = meta.num_decodes
    tables = meta.block_tables[:nd]
    lens = seq_lens[:nd]
    if not window:  # every row from its first block: the table's leading columns, no index arithmetic
        max_len = max(lens)
        blocks = tables[:, : -(-max_len // block_size)].reshape(-1).long()
        if min(lens) == max_len:
            return KVGather(blocks, nd, max_len, None)
        n = meta.seq_lens[:nd].to(tables.device)
        visible = torch.arange(max_len, device=tables.device)[None, :] < n[:, None]
        return KVGather(blocks, nd, max_len, visible[:, None, :])
    first = [max(0, n - window) // block_size for n in lens]
    width = max(-(-n // block_size) - f for n, f in zip(lens, first))
    cols = torch.tensor(first, device=tables.device)[:, None] + torch.arange(width, device=tables.device)[None, :]
    blocks = tables.gather(1, cols.clamp(max=tables.shape[1] - 1)).reshape(-1).long()
    key_pos = cols.repeat_interleave(block_size, dim=1) * block_size + \
        torch.arange(block_size, device=tables.device).repeat(width)[None, :]
    n = torch.tensor(lens, device=tables.device)[:, None]
    visible = (key_pos < n) & (key_pos >= n - window)
    return KVGather(blocks, nd, width * block_size, visible[:, None, :])


def _prefill_gather(table: torch.Tensor, total: int, n: int, block_size: int, window: int | None) -> KVGather:
    """One prefill chunk's keys: from the first block any of its queries sees (all of them without a
    window) to its end, masked causally and to each query's window."""
    first = max(0, total - n - window + 1) // block_size if window else 0
    blocks = table[first : -(-total // block_size)].long()
    key_pos = torch.arange(first * block_size, total, device=table.device)
    q_pos = torch.arange(total - n, total, device=table.device)
    visible = key_pos[None, :] <= q_pos[:, None]
    if window:
        visible &= key_pos[None, :] > q_pos[:, None] - window
    return KVGather(blocks, 1, total - first * block_size, visible[None])


def plan_step(meta: AttentionMetadata, block_size: int, window: int | None = None
              ) -> tuple[KVGather | None, list[tuple[int, int, KVGather]]]:
    """What every layer of a step with this window (None: global) gathers, built once per step and window:
    the decode rows as one padded batch, and (first token, query tokens, gather) per prefill chunk."""
    nd = meta.num_decodes
    seq_lens = meta.host_seq_lens()
    query_lens = meta.query_lens_host if meta.query_lens_host is not None else \
        (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).tolist()
    decode = _decode_gather(meta, seq_lens, block_size, window) if nd else None
    prefills = []
    start = meta.num_decode_tokens
    for i in range(nd, meta.num_seqs):
        n, total = query_lens[i], seq_lens[i]
        prefills.append((start, n, _prefill_gather(meta.block_tables[i], total, n, block_size, window)))
        start += n
    return decode, prefills


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           softcap: float | None = None) -> torch.Tensor:
    """q [S, Q, H, D], k/v [S, L, Hkv, D], mask [S, Q, L] (True = attend) -> [S, Q, H, D]; GQA by grouping.
    A query row with no visible key comes out as zeros. Computed in float32 whatever the cache dtype (as the
    reference; the fused kernels keep reduced-precision probabilities in bf16/fp16)."""
    if softcap:
        return _attend_softcapped(q, k, v, mask, scale, softcap)
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                         v.float().transpose(1, 2), attn_mask=None if mask is None else mask[:, None],
                                         scale=scale, enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)
    return (out if mask is None else out.nan_to_num(0.0)).to(q.dtype)


def _attend_softcapped(q, k, v, mask, scale: float, softcap: float) -> torch.Tensor:
    """`attend` with tanh soft-capped logits (Gemma 2), which SDPA cannot express: written out in the
    order transformers' eager attention uses (scale, / cap, tanh, * cap, mask, softmax)."""
    group = q.shape[2] // k.shape[2]
    qf = q.float().transpose(1, 2)  # [S, H, Q, D]
    kf = k.float().repeat_interleave(group, dim=2).transpose(1, 2)
    vf = v.float().repeat_interleave(group, dim=2).transpose(1, 2)
    scores = torch.tanh(qf @ kf.transpose(-1, -2) * scale / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    out = scores.softmax(dim=-1).nan_to_num(0.0) @ vf
    return out.transpose(1, 2).to(q.dtype)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    supports_cuda_graphs = False  # loops over prefill sequences on the host

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size  # of the KV caches it attends over
        # The step's gathers and masks, the same for every layer of one window: built once per step and
        # window (a model has one or two windows: None and its sliding window).
        self._meta: AttentionMetadata | None = None
        self._plans: dict[int | None, tuple[KVGather | None, list[tuple[int, int, KVGather]]]] = {}
        # Also the same for every layer of a step (a CPU decode step is mostly small ops: each one saved
        # per layer counts): RoPE's factors per (table, positions), whether a slot mapping has padding.
        self._rope_rows: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        self._all_valid: dict[int, tuple[torch.Tensor, bool]] = {}

    def prepare(self, meta: AttentionMetadata) -> None:
        self._meta, self._plans, self._rope_rows, self._all_valid = meta, {}, {}, {}

    def write_cache(self, q, k, v, positions, cos_sin_cache, kv_cache, slot_mapping, kv_scale=(1.0, 1.0)):
        # A table by its storage (a model with a local RoPE base passes a fresh view of one of two tables per
        # layer), positions by identity (one tensor for every layer); both kept beside the rows, so neither
        # address nor id can be reused within the step.
        key = (cos_sin_cache.data_ptr(), id(positions))
        if key not in self._rope_rows:
            rows = cos_sin_cache.index_select(0, positions)
            self._rope_rows[key] = (positions, cos_sin_cache, rope_factors(rows))
        q, k = apply_rope_qk(q, k, self._rope_rows[key][2])
        if id(slot_mapping) not in self._all_valid:
            self._all_valid[id(slot_mapping)] = (slot_mapping, bool((slot_mapping >= 0).all()))
        write_kv(k, v, kv_cache, slot_mapping, kv_scale, self._all_valid[id(slot_mapping)][1])
        return q, k

    def attend(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float, window=None, softcap=None,
               kv_scale=(1.0, 1.0)):
        assert self._meta is meta, "prepare(meta) comes once per step, before the first layer"
        assert kv_cache[0].shape[1] == self.block_size, "a KV cache of another block size"
        if window not in self._plans:
            self._plans[window] = plan_step(meta, self.block_size, window)
        decode, prefills = self._plans[window]
        if decode is not None and not prefills and decode.rows == q.shape[0]:  # a decode-only step: no copy
            kd, vd = gather_kv(kv_cache, decode, kv_scale)
            return attend(q[:, None], kd, vd, decode.mask, scale, softcap)[:, 0]
        out = torch.empty_like(q)
        if decode is not None:
            kd, vd = gather_kv(kv_cache, decode, kv_scale)
            out[: decode.rows] = attend(q[: decode.rows, None], kd, vd, decode.mask, scale, softcap)[:, 0]
        for start, n, g in prefills:
            ks, vs = gather_kv(kv_cache, g, kv_scale)
            out[start : start + n] = attend(q[None, start : start + n], ks, vs, g.mask, scale, softcap)[0]
        return out
