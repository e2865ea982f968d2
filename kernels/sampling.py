"""Seeded random sampling in one pass over the logits: the Gumbel/exponential-max trick with counter noise.

token[b] = argmax_v(x[b, v] - log(-log u[b, v])), where u[b, v] is the v-th output of a splitmix64 stream
keyed by (seed_b, step_b): exactly the uniforms of services.gpu_worker.sampler.hash_uniform, generated in
registers (64-bit wrapping integer math on uint64) instead of as a [B, V] int64 tensor. The logits are
read once; nothing of size [B, V] is written.

Stage 1 runs B x S programs; each scans a contiguous chunk of its row's vocabulary in tiles, keeping a
per-lane running best (strict `>`, so the earliest index wins ties), and reduces to one (value, index) pair.
With S == 1 that is the answer; otherwise stage 2 reduces the S partials of each row (ties: smallest
index). S depends only on shapes (CUDA-graph safe): enough programs to fill the GPU when B is small.

Edge cases (the torch path is `(x - log(-log u)).argmax(-1)`):
- ties: smallest index, like torch.argmax;
- a row that is all -inf: index 0, like torch.argmax (every value ties at -inf);
- NaN logits count as +inf here (the first NaN or +inf wins); torch ranks NaN above +inf, so the two
  differ only on rows holding both a +inf and a later NaN;
- `log` may differ from torch's by an ulp, so tokens can differ on exact float near-ties.

hash_uniform_ref is a twin of the sampler's hash_uniform rather than the one copy it imports: this module
imports Triton (optional, and loaded only on first CUDA use), and kernels never import services.
tests/kernels/test_sampling.py holds the kernel, both torch copies and a pure-Python splitmix64 to the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils

# splitmix64 constants (as unsigned 64-bit values; in a kernel they are uint64 constants).
_GAMMA = tl.constexpr(0x9E3779B97F4A7C15)
_MUL1 = tl.constexpr(0xBF58476D1CE4E5B9)
_MUL2 = tl.constexpr(0x94D049BB133111EB)

_MAX_BLOCK = 1024
# Stage 1 aims at this many programs per SM (when B alone gives fewer).
_PROGRAMS_PER_SM = 8


@triton.jit
def _mix64(z):
    """splitmix64 finaliser on uint64 (logical shifts, wrapping multiplies)."""
    z ^= z >> 30
    z *= _MUL1
    z ^= z >> 27
    z *= _MUL2
    return z ^ (z >> 31)


@triton.jit
def _row_key(seeds_ptr, steps_ptr, row):
    """Key of row `row`'s stream: mix(mix(seed + GAMMA) ^ step) * MUL2 + GAMMA)."""
    seed = tl.load(seeds_ptr + row).to(tl.uint64, bitcast=True)
    step = tl.load(steps_ptr + row).to(tl.uint64, bitcast=True)
    key = _mix64(seed + _GAMMA) ^ step
    return _mix64(key * _MUL2 + _GAMMA)


@triton.jit
def _uniform(ctr):
    """Uniform in (0, 1) from the stream counter key + (v + 1) * GAMMA: the high 23 bits of its mix as an
    odd multiple of 2^-24 (exact in float32, never 0 or 1)."""
    hi = (_mix64(ctr) >> 41).to(tl.int32).to(tl.float32)
    return (hi * 2.0 + 1.0) * 5.9604644775390625e-08  # 2**-24


@triton.jit
def _hash_uniform_kernel(seeds_ptr, steps_ptr, out_ptr, stride_out, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    key = _row_key(seeds_ptr, steps_ptr, row)
    u = _uniform(key + (offs + 1).to(tl.uint64) * _GAMMA)
    tl.store(out_ptr + row.to(tl.int64) * stride_out + offs, u, mask=offs < V)


# CHUNK and num_splits follow the batch size: not specialised on, so no batch size compiles a new variant.
@triton.jit(do_not_specialize=["CHUNK", "num_splits"])
def _gumbel_argmax_kernel(
    x_ptr, seeds_ptr, steps_ptr, val_ptr, idx_ptr,
    stride_x, V, CHUNK, num_splits,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    lane = tl.arange(0, BLOCK)
    key = _row_key(seeds_ptr, steps_ptr, row)
    lo = split * CHUNK
    # Stream counter of element v is key + (v + 1) * GAMMA (mod 2^64): multiplied out once for the first
    # tile, then advanced by BLOCK * GAMMA per tile (an add instead of a 64-bit multiply per element).
    ctr = key + (lo + lane + 1).to(tl.uint64) * _GAMMA
    ctr_step = tl.full([BLOCK], BLOCK, tl.uint64) * _GAMMA
    hi = tl.minimum(lo + CHUNK, V)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    # Never-updated lanes keep an index inside the chunk: an all -inf chunk reduces to its first index.
    best_idx = lo + lane
    for start in range(lo, hi, BLOCK):
        offs = start + lane
        mask = offs < hi
        x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        u = _uniform(ctr)
        ctr += ctr_step
        g = x - tl.log(-tl.log(u))  # same op order as the torch path: x - log(q), q = -log(u)
        g = tl.where(g != g, float("inf"), g)  # NaN ranks as +inf
        take = g > best  # strict: within a lane, the earlier index keeps a tie
        best = tl.where(take, g, best)
        best_idx = tl.where(take, offs, best_idx)
    m = tl.max(best, axis=0)
    idx = tl.min(tl.where(best == m, best_idx, V), axis=0)
    if SPLIT:
        tl.store(val_ptr + row * num_splits + split, m)
        tl.store(idx_ptr + row * num_splits + split, idx)
    else:
        tl.store(idx_ptr + row, idx.to(tl.int64))


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_splits_kernel(val_ptr, idx_ptr, out_ptr, num_splits, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    mask = s < num_splits
    v = tl.load(val_ptr + row * num_splits + s, mask=mask, other=float("-inf"))
    i = tl.load(idx_ptr + row * num_splits + s, mask=mask, other=2147483647)
    m = tl.max(v, axis=0)
    # Splits cover increasing index ranges, so the smallest index among the maxima is the first one.
    tl.store(out_ptr + row, tl.min(tl.where(v == m, i, 2147483647), axis=0).to(tl.int64))


def _block(V: int, block: int | None) -> int:
    return block if block is not None else min(_MAX_BLOCK, max(16, _utils.next_pow2(V)))


def default_num_splits(batch: int, vocab_size: int, block: int, device: torch.device) -> int:
    """Stage-1 splits per row: about _PROGRAMS_PER_SM programs per SM, at least one tile per split.
    Shapes only, never values. Off CUDA (the interpreter) one split: no second pass."""
    if device.type != "cuda" or batch == 0:
        return 1
    want = triton.cdiv(_PROGRAMS_PER_SM * _utils.num_sms(device), batch)
    return max(1, min(triton.cdiv(vocab_size, block), want))


def _check(seeds: torch.Tensor, steps: torch.Tensor, B: int, device: torch.device) -> None:
    for t in (seeds, steps):
        assert t.shape == (B,) and t.dtype == torch.int64 and t.is_contiguous() and t.device == device


def hash_gumbel_argmax(
    x: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
    num_splits: int | None = None, block: int | None = None,
) -> torch.Tensor:
    """x: [B, V] float32 logits (-inf allowed), seeds / steps: [B] int64. Returns [B] int64 token ids:
    argmax_v(x[b, v] - log(-log u[b, v])) with u = hash_uniform(seeds, steps, V). x is not modified."""
    assert x.dim() == 2 and x.dtype == torch.float32
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, V = x.shape
    assert V > 0
    _check(seeds, steps, B, x.device)
    out = torch.empty(B, dtype=torch.int64, device=x.device)
    if B == 0:
        return out
    BLOCK = _block(V, block)
    S = num_splits if num_splits is not None else default_num_splits(B, V, BLOCK, x.device)
    # Chunks are whole tiles; recount S so that no split is empty.
    chunk = triton.cdiv(triton.cdiv(V, max(1, S)), BLOCK) * BLOCK
    S = triton.cdiv(V, chunk)
    if S == 1:
        _gumbel_argmax_kernel[(B, 1)](
            x, seeds, steps, out, out, x.stride(0), V, chunk, 1, SPLIT=False, BLOCK=BLOCK, num_warps=4)
        return out
    vals = _utils.empty((B, S), torch.float32, x.device)
    idxs = torch.empty((B, S), dtype=torch.int32, device=x.device)
    _gumbel_argmax_kernel[(B, S)](
        x, seeds, steps, vals, idxs, x.stride(0), V, chunk, S, SPLIT=True, BLOCK=BLOCK, num_warps=4)
    # One tile width for every split count this vocabulary can get (one compiled variant).
    max_splits = min(triton.cdiv(V, BLOCK), _PROGRAMS_PER_SM * _utils.num_sms(x.device)) if x.is_cuda else S
    _reduce_splits_kernel[(B,)](vals, idxs, out, S, BLOCK_S=max(16, _utils.next_pow2(max(S, max_splits))),
                                num_warps=1)
    return out


def warm_up(vocab_size: int, max_batch: int, device: torch.device) -> None:
    """Compile the variants serving reaches (split rows for small batches, whole rows past a few hundred)
    before the first request: a compile mid-serving stalls every request for about a second."""
    for batch in sorted({1, max_batch}):
        x = torch.zeros(batch, vocab_size, dtype=torch.float32, device=device)
        ids = torch.zeros(batch, dtype=torch.int64, device=device)
        hash_gumbel_argmax(x, ids, ids)


def hash_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int, block: int | None = None) -> torch.Tensor:
    """[B, V] float32: the uniforms hash_gumbel_argmax draws, materialised (tests and debugging)."""
    B = seeds.shape[0]
    _check(seeds, steps, B, seeds.device)
    out = _utils.empty((B, vocab_size), torch.float32, seeds.device)
    if B == 0 or vocab_size == 0:
        return out
    BLOCK = _block(vocab_size, block)
    _hash_uniform_kernel[(B, triton.cdiv(vocab_size, BLOCK))](
        seeds, steps, out, out.stride(0), vocab_size, BLOCK=BLOCK, num_warps=4)
    return out


# --------------------------------------------------------------------------- torch reference

_U64 = (1 << 64) - 1


def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    x &= _U64
    return x - (1 << 64) if x >= 1 << 63 else x


def _mix64_ref_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser in place on int64: `>>` is arithmetic there, so masked to a logical shift."""
    z ^= (z >> 30) & ((1 << 34) - 1)
    z *= _i64(_MUL1.value)
    z ^= (z >> 27) & ((1 << 37) - 1)
    z *= _i64(_MUL2.value)
    z ^= (z >> 31) & ((1 << 33) - 1)
    return z


def hash_uniform_ref(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Torch twin of the kernels' uniforms (the same bits as services.gpu_worker.sampler.hash_uniform)."""
    gamma = _i64(_GAMMA.value)
    key = _mix64_ref_(seeds + gamma)
    key ^= steps
    key = _mix64_ref_(key * _i64(_MUL2.value) + gamma)
    offs = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=seeds.device) * gamma
    z = _mix64_ref_(key[:, None] + offs)
    hi = ((z >> 41) & ((1 << 23) - 1)).to(torch.float32)
    return hi.mul_(2.0).add_(1.0).mul_(2.0**-24)


def hash_gumbel_argmax_ref(x: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The sampler's torch path: argmax(x - log(-log u)), ties to the smallest index."""
    q = hash_uniform_ref(seeds, steps, x.shape[-1]).log_().neg_()
    return (x.float() - q.log_()).argmax(dim=-1)
