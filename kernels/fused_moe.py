"""Fused mixture-of-experts: every expert's SwiGLU MLP over the tokens routed to it, in two grouped GEMMs.

Each token goes to top_k experts; a (token, j) pair is one row of work. `align_by_expert` sorts the pairs by
expert and pads each expert's run to a multiple of BLOCK_M, so every BLOCK_M-row block belongs to one
expert. Then:
  1. one launch over (row blocks x intermediate tiles): h = silu(x W_gate^T) * (x W_up^T) for each pair,
     gate and up accumulated side by side from the expert's stacked w13 [E, 2I, H], SiLU-and-mul fused;
  2. one launch over (row blocks x hidden tiles): y = h W_down^T scaled by the pair's routing weight;
and the top_k rows of each token are summed. A program loads its block's pair ids and expert from the
alignment; blocks past the real total return at once.

Up to ALIGN_KERNEL_MAX_PAIRS pairs (decode steps) the alignment is one single-program launch
(`align_by_expert_kernel`); larger steps use the parallel device ops of `align_by_expert`, its reference.

Nothing here syncs with the host or depends on the routing for its shapes: the alignment buffers are sized
for the worst case (every pair's expert padded by BLOCK_M - 1), so CUDA graphs capture it. The block sizes
come from the expected rows per expert (`default_config`): a decode step streams each touched expert's
weights once with 16-row blocks, a prefill chunk uses tensor-core-sized tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _utils


@dataclass(frozen=True)
class MoeConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def default_config(num_tokens: int, top_k: int, num_experts: int) -> MoeConfig:
    """Block sizes by the rows an expert expects (routing roughly uniform): BLOCK_M about 1.5x that count,
    so most touched experts fit in one row block and their weights stream once."""
    expected = num_tokens * top_k / num_experts
    block_m = min(128, max(16, _utils.next_pow2(int(1.5 * expected) + 1)))
    if block_m <= 32:
        return MoeConfig(block_m, 64, 128, num_warps=4, num_stages=4)
    if block_m == 64:
        return MoeConfig(64, 128, 64, num_warps=4, num_stages=3)
    return MoeConfig(128, 128, 64, num_warps=8, num_stages=3)


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows after per-expert padding, at worst: each expert that receives a pair adds up to BLOCK_M - 1."""
    return triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs sorted by expert, each expert's run padded to a multiple of block_m. Returns
    sorted_pairs [max_padded] int32 (pair index t * top_k + j, or num_pairs in padding rows),
    block_experts [max_padded / block_m] int32 (each row block's expert) and num_padded [1] int32 (the rows
    in use). Device ops only, shapes fixed by (num_pairs, num_experts, block_m)."""
    flat = topk_ids.flatten().long()
    n, device = flat.numel(), flat.device
    size = max_padded_rows(n, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    first_pair = counts.cumsum(0) - counts  # where each expert's pairs start in the sorted order
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    rank = torch.arange(n, device=device) - first_pair[sorted_experts]  # among its expert's pairs
    dest = padded_end[sorted_experts] - padded[sorted_experts] + rank
    sorted_pairs = torch.full((size,), n, dtype=torch.int32, device=device).scatter_(0, dest, order.int())
    block_starts = torch.arange(0, size, block_m, device=device)
    block_experts = torch.searchsorted(padded_end, block_starts, right=True).clamp_max_(num_experts - 1).int()
    return sorted_pairs, block_experts, padded_end[-1:].int()


# Up to this many pairs (a decode step: 128 sequences x top 8), one program aligns them in a single launch;
# beyond, the device ops of align_by_expert (a dozen launches, each parallel) are faster than one program.
ALIGN_KERNEL_MAX_PAIRS = 1024


@triton.jit(do_not_specialize=["num_pairs", "size"])
def _align_kernel(ids_ptr, sorted_pairs_ptr, block_experts_ptr, num_padded_ptr, num_pairs, size,
                  NUM_EXPERTS: tl.constexpr, E_P2: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """align_by_expert in one program: count pairs per expert, lay the padded runs out, fill the padding,
    scatter each pair to its expert's next slot (pairs keep their order within an expert), and name each row
    block's expert. A chunk of pairs meets the experts as a [CHUNK, E_P2] one-hot matrix, whose column
    cumsum gives each pair's rank among the chunk's pairs of its expert."""
    experts = tl.arange(0, E_P2)
    counts = tl.zeros((E_P2,), dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=E_P2)  # E_P2 matches no expert
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)
    tl.store(num_padded_ptr, tl.sum(padded, axis=0))
    for start in range(0, size, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        tl.store(sorted_pairs_ptr + offs, tl.zeros((CHUNK,), dtype=tl.int32) + num_pairs, mask=offs < size)
    tl.debug_barrier()  # the padding is written before any pair lands on its slot
    next_slot = end - padded
    for start in range(0, num_pairs, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=E_P2)
        onehot = (e[:, None] == experts[None, :]).to(tl.int32)
        slot = tl.cumsum(onehot, axis=0) - onehot + next_slot[None, :]
        tl.store(sorted_pairs_ptr + tl.sum(onehot * slot, axis=1), offs, mask=offs < num_pairs)
        next_slot += tl.sum(onehot, axis=0)
    real = experts[None, :] < NUM_EXPERTS
    for start in range(0, size // BLOCK_M, CHUNK):
        blocks = start + tl.arange(0, CHUNK)
        before = tl.sum(((end[None, :] <= blocks[:, None] * BLOCK_M) & real).to(tl.int32), axis=1)
        tl.store(block_experts_ptr + blocks, tl.minimum(before, NUM_EXPERTS - 1), mask=blocks < size // BLOCK_M)


def align_by_expert_kernel(topk_ids: torch.Tensor, num_experts: int, block_m: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """align_by_expert in one launch (for up to ALIGN_KERNEL_MAX_PAIRS pairs); the same three tensors."""
    n, device = topk_ids.numel(), topk_ids.device
    size = max_padded_rows(n, num_experts, block_m)
    sorted_pairs = torch.empty(size, dtype=torch.int32, device=device)
    block_experts = torch.empty(size // block_m, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    e_p2 = _utils.next_pow2(num_experts)
    _align_kernel[(1,)](topk_ids.contiguous(), sorted_pairs, block_experts, num_padded, n, size,
                        NUM_EXPERTS=num_experts, E_P2=e_p2, BLOCK_M=block_m, CHUNK=max(16, min(1024, 8192 // e_p2)),
                        num_warps=4)
    return sorted_pairs, block_experts, num_padded


@triton.jit(do_not_specialize=["num_pairs"])  # the batch's pair count changes per step: one compile for all
def _moe_gemm_kernel(a_ptr, b_ptr, out_ptr, weights_ptr, sorted_pairs_ptr, block_experts_ptr, num_padded_ptr,
                     N, K, num_pairs, pairs_per_a_row, stride_am, stride_be, stride_bn, stride_om,
                     GATED: tl.constexpr, WEIGHTED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[pair, n] = (a[pair // pairs_per_a_row] . b[e, n]) for the block's pairs and expert e;
    GATED: b holds gate rows [0, N) then up rows [N, 2N) and out = silu(gate) * up; WEIGHTED: out is scaled by
    the pair's routing weight. b is [E, rows, K] with K contiguous."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    mask_m = pairs < num_pairs
    a_rows = (pairs // pairs_per_a_row).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATED:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if WEIGHTED:
        acc *= tl.load(weights_ptr + pairs, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def block_n_for(n_out: int, busy_row_blocks: int, block_n: int, num_sms: int) -> int:
    """cfg.block_n, halved (down to 16) while the row blocks that hold pairs times the column tiles give fewer
    than two programs per SM: a decode step touches few experts, and a narrow output (Mixtral's down, H = 4096;
    Qwen3-MoE's gate|up, I = 768) would otherwise leave SMs idle while the weights stream."""
    while block_n > 16 and busy_row_blocks * triton.cdiv(n_out, block_n) < 2 * num_sms:
        block_n //= 2
    return block_n


def _launch_block_n(num_pairs: int, num_experts: int, n_out: int, cfg: MoeConfig, device: torch.device) -> int:
    if device.type != "cuda":
        return cfg.block_n
    # Row blocks holding pairs, at most: one per touched expert plus the ones the pairs fill.
    busy = min(max_padded_rows(num_pairs, num_experts, cfg.block_m) // cfg.block_m,
               min(num_experts, num_pairs) + num_pairs // cfg.block_m)
    return block_n_for(n_out, busy, cfg.block_n, _utils.num_sms(device))


def launch_variants(max_tokens: int, top_k: int, num_experts: int, inter: int, hidden: int,
                    device: torch.device) -> dict[tuple, int]:
    """Every compiled variant fused_moe can launch for 1..max_tokens tokens of this shape (its default
    config, the column tiles of both GEMMs, which alignment), each with the fewest tokens that launch it: what a
    warm-up must run so that no variant compiles while serving."""
    variants: dict[tuple, int] = {}
    for tokens in range(1, max_tokens + 1):
        cfg, pairs = default_config(tokens, top_k, num_experts), tokens * top_k
        key = (cfg, _launch_block_n(pairs, num_experts, inter, cfg, device),
               _launch_block_n(pairs, num_experts, hidden, cfg, device), pairs <= ALIGN_KERNEL_MAX_PAIRS)
        variants.setdefault(key, tokens)
    return variants


def _launch(a, b, out, weights, aligned, pairs_per_a_row: int, gated: bool, cfg: MoeConfig) -> None:
    sorted_pairs, block_experts, num_padded = aligned
    n_out, k = out.shape[1], a.shape[1]
    block_n = _launch_block_n(out.shape[0], b.shape[0], n_out, cfg, a.device)
    grid = (block_experts.numel(), triton.cdiv(n_out, block_n))
    _moe_gemm_kernel[grid](a, b, out, weights, sorted_pairs, block_experts, num_padded,
                           n_out, k, out.shape[0], pairs_per_a_row, a.stride(0), b.stride(0), b.stride(1),
                           out.stride(0), GATED=gated, WEIGHTED=not gated,
                           DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",  # float32 stays exact
                           BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_K=cfg.block_k,
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, cfg: MoeConfig | None = None) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I], topk_weights [T, k] (float32),
    topk_ids [T, k] -> [T, H] in x's dtype: what fused_moe_ref.fused_moe_reference computes."""
    num_tokens, top_k = topk_ids.shape
    num_experts, two_i, hidden = w13.shape
    assert x.stride(-1) == 1 and w13.is_contiguous() and w2.is_contiguous()
    assert w2.shape == (num_experts, hidden, two_i // 2)
    cfg = cfg or default_config(num_tokens, top_k, num_experts)
    num_pairs = num_tokens * top_k
    if num_tokens == 0:
        return x.new_zeros(0, hidden)
    align = align_by_expert_kernel if num_pairs <= ALIGN_KERNEL_MAX_PAIRS else align_by_expert
    aligned = align(topk_ids, num_experts, cfg.block_m)
    h = _utils.empty((num_pairs, two_i // 2), x.dtype, x.device)
    _launch(x, w13, h, topk_weights, aligned, top_k, True, cfg)
    y = _utils.empty((num_pairs, hidden), x.dtype, x.device)
    _launch(h, w2, y, topk_weights.float().contiguous(), aligned, 1, False, cfg)
    return y.view(num_tokens, top_k, hidden).sum(dim=1)
