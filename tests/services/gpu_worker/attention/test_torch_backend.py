"""The torch paged backend equals dense causal attention on random inputs with random block tables."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headrace.services.gpu_worker.attention.base import AttentionMetadata
from headrace.services.gpu_worker.attention.torch_backend import TorchAttentionBackend, apply_rope, rotate


def dense_reference(q, k, v, scale):
    """Full causal attention over one sequence; q [n, H, D], k/v [L, Hkv, D] with the queries at the end."""
    h, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // hkv, dim=1)
    v = v.repeat_interleave(h // hkv, dim=1)
    n, length = q.shape[0], k.shape[0]
    mask = torch.ones(n, length, dtype=torch.bool).tril(length - n)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (8, 2, 32), (6, 3, 64)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paged_matches_dense(heads, kv_heads, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    bs, num_blocks = 16, 64
    # (context already cached, new tokens this step): decodes first, then prefills, one fully new.
    shapes = [(37, 1), (16, 1), (0, 1), (5, 23), (0, 40), (31, 17)]
    num_decodes = 3
    max_pos = 256
    cos_sin = torch.randn(max_pos, head_dim, generator=g)
    k_cache = torch.randn(num_blocks, bs, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, bs, kv_heads, head_dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, full_k, full_v = [], [], []
    q_parts, k_new, v_new, pos, slots = [], [], [], [], []
    for ctx, n in shapes:
        total = ctx + n
        blocks = [perm.pop() for _ in range(-(-total // bs))]
        tables.append(blocks)
        kk = torch.randn(total, kv_heads, head_dim, generator=g)
        vv = torch.randn(total, kv_heads, head_dim, generator=g)
        for p in range(ctx):  # the cached prefix is already in the cache (with RoPE applied)
            k_cache[blocks[p // bs], p % bs] = kk[p]
            v_cache[blocks[p // bs], p % bs] = vv[p]
        positions = torch.arange(ctx, total)
        q_parts.append(torch.randn(n, heads, head_dim, generator=g))
        k_new.append(kk[ctx:])
        v_new.append(vv[ctx:])
        pos.append(positions)
        slots.append(torch.tensor([blocks[p // bs] * bs + p % bs for p in range(ctx, total)]))
        full_k.append(kk)
        full_v.append(vv)
    qlens = [n for _, n in shapes]
    table = torch.zeros(len(shapes), max(len(t) for t in tables), dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots), query_start_loc=torch.tensor([0] + qlens).cumsum(0).int(),
        seq_lens=torch.tensor([c + n for c, n in shapes]).int(), context_lens=torch.tensor([c for c, _ in shapes]).int(),
        block_tables=table, num_decodes=num_decodes, num_decode_tokens=num_decodes, max_query_len=max(qlens),
        max_seq_len=max(c + n for c, n in shapes))
    positions = torch.cat(pos)
    scale = head_dim ** -0.5
    out = TorchAttentionBackend(block_size=bs).forward(torch.cat(q_parts), torch.cat(k_new), torch.cat(v_new), positions, cos_sin,
                                          (k_cache, v_cache), meta, scale)
    start = 0
    for i, (ctx, n) in enumerate(shapes):
        q_rot = apply_rope(q_parts[i], pos[i], cos_sin)
        k_all = full_k[i].clone()
        k_all[ctx:] = apply_rope(k_new[i], pos[i], cos_sin)  # new keys get RoPE; the cache held rotated ones
        ref = dense_reference(q_rot, k_all, full_v[i], scale)
        torch.testing.assert_close(out[start : start + n], ref, atol=1e-5, rtol=1e-5)
        start += n
    # the new keys/values were written through the slot mapping
    for i, (ctx, n) in enumerate(shapes):
        for j, p in enumerate(range(ctx, ctx + n)):
            b = tables[i][p // bs]
            torch.testing.assert_close(v_cache[b, p % bs], full_v[i][p])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_by_whole_row_factors_is_the_rotate_half_formula_bit_for_bit(dtype):
    """rotate_by's x * (cos | cos) + (x2 | x1) * (-sin | sin) is x1 cos - x2 sin | x2 cos + x1 sin exactly:
    the float path stays equal to transformers' RoPE."""
    torch.manual_seed(0)
    x, cs = torch.randn(5, 3, 16).to(dtype), torch.randn(5, 16)
    cos, sin = cs[:, None, :8], cs[:, None, 8:]
    x1, x2 = x.float()[..., :8], x.float()[..., 8:]
    expected = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(dtype)
    assert torch.equal(rotate(x, cs), expected)
