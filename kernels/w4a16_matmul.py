"""W4A16 matmul, y = x @ dequant(qweight) (+ bias): 4-bit weights, 16-bit (or fp32) activations, fp32 accumulation.

At decode batch sizes a Linear layer is bound by reading its weight once; 4-bit weights with one fp16/bf16 scale
and zero per G inputs stream ~3.5x fewer bytes than bf16 (G = 128: 0.5 + 4/128 bytes per weight against 2), so
the whole small-M design is about streaming that weight at the copy bandwidth with little ALU work per nibble.

One layout, which the loaders convert every checkpoint format (GPTQ, AWQ, compressed-tensors) into:
- qweight [K // 8, N] int32: the nibble of input k, output n is (qweight[k // 8, n] >> 4 * (k % 8)) & 0xF;
  consecutive n are consecutive words, so a tile of rows is a set of fully coalesced N-contiguous loads.
- scales, zeros [K // G, N] in the activation dtype; w[k, n] = (q(k, n) - zeros[k // G, n]) * scales[k // G, n].

Unpacking: one loaded [BLOCK_K // 8, BLOCK_N] word tile is shifted by 0, 4, .., 28 into a [BLOCK_K // 8, 8,
BLOCK_N] tensor, masked to the low nibble and reshaped (row-major, so k = 8 * row + j) to [BLOCK_K, BLOCK_N]. For
16-bit activations the nibble becomes a float without an int-to-float conversion (16 results/clk/SM on sm_80/90,
an eighth of the fp32 rate): OR-ing the exponent bits of 128.0 (bf16, 0x4300) or 1024.0 (fp16, 0x6400) into it
and reinterpreting the low 16 bits gives exactly OFFSET + q (the mantissa has room for 4 more bits). The offset
is taken out with the zero point:
sum_k x_k (OFFSET + q_k) - (OFFSET + z) sum_k x_k = sum_k x_k (q_k - z), exact up to fp32 rounding.

Small M (M <= 16, decode), `_w4a16_skinny_kernel`, grid (cdiv(N, BLOCK_N), SPLIT_K), as gemv.py: each program
owns BLOCK_N output columns and one contiguous K slice of whole BLOCK_K tiles, x padded to 16 rows (rows >= M
masked: no traffic) so the multiply is one tensor-core tl.dot per tile, which Triton's pipeliner streams through
shared memory with num_stages tiles in flight. Why tl.dot rather than an elementwise multiply-reduce: at 4.8
TB/s an H200 SM must retire ~37 nibbles a cycle, ~3.5 of its 128 thread-instructions a cycle per nibble. The
elementwise form needs a shift, a mask, a conversion (or magic-or + subtract) and M FMAs per nibble (>= 4 at M =
1, 19 at M = 16: compute bound far below the bandwidth); the dot leaves the ALUs only the unpack (shift, mask-or,
a 16-bit pack) whatever M is, and the multiply to the tensor core.
A tile never crosses a group (BLOCK_K divides G, or there is one group), so the scale and zero are applied
once per tile to the fp32 dot result instead of per weight: acc += dot(x, OFFSET + q) * s - sum(x) * (z +
OFFSET) * s, i.e. BLOCK_N FMAs per row per tile against BLOCK_K * BLOCK_N weights, and the weight is never
rounded to 16 bits (the reference's fp32 dequantization, to fp32 rounding). SPLIT_K > 1 writes fp32 partials
[SPLIT_K, 16, N] that gemv.py's reduce kernel sums in a fixed order (deterministic, no atomics), adding the bias.

M > 16 (larger decode batches, prefill), `_w4a16_gemm_kernel`: a tiled GEMM, grid (cdiv(M, BLOCK_M) *
cdiv(N, BLOCK_N) in grouped order, split), GROUP_M row blocks walking the N blocks together so a weight tile's
other row blocks find it in L2. Each K step dequantizes the [BLOCK_K, BLOCK_N] weight tile in registers (OFFSET
+ q as above, one FMA with s and -(z + OFFSET) * s, then x's dtype) and tl.dot's it into the fp32 accumulator:
with BLOCK_M rows per tile the tensor core, not the unpack, is the bound, and the dequantization is amortised over
the rows. At batch 17-64 there are few row blocks and a layer like o_proj has only 32 column blocks, so the GEMM
splits K too, as a runtime argument (a runtime branch picks the partial or the final store), reduced by the same
deterministic kernel (for a given M; like cuBLAS, a row's rounding may differ between batch sizes); prefill grids
are large enough and never split.

No per-call recompiles: M is never specialised on (do_not_specialize), nor are the split count and length, the
group size or the GEMM partials' M-dependent stride; every constexpr comes from (N, K, G, dtype), the path (M <=
16 or not) and the config, and the skinny partials' strides do not depend on M. `default_config` is the policy.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _utils, int_packing
from .gemv import _gemv_reduce_kernel  # the deterministic split-K reduction (sum in a fixed order, bias, cast)
from .gemv import store_row, store_rows
from .tile_order import grouped_tile

PACK = 8  # nibbles per int32 word
MAX_SKINNY_M = 16  # rows of the padded dot in the small-M kernel (tl.dot needs >= 16); larger M takes the GEMM
_GEMV_PROGRAMS = 512  # M = 1: split K until the grid holds this many programs (about 4 per SM)
_PROGRAMS_PER_SM = 4  # skinny kernel: aim for >= 4 programs per SM over the whole grid (the GEMM: 1)
_MAX_GEMM_SPLIT = 16  # the GEMM's reduction is compiled for up to 16 splits, whatever the split of the call
_MIN_SPLIT_BYTES = 32 << 10  # a split streams >= 32 KiB of packed weight: the pipeline prologue amortised
_REDUCE_BLOCK = 256
# 16-bit activations: exponent bits that turn a nibble q into the float OFFSET + q when OR-ed in (see above).
_MAGIC = {torch.float16: (0x6400, 1024.0), torch.bfloat16: (0x4300, 128.0), torch.float32: (0, 0.0)}


class W4A16Config(NamedTuple):
    """Launch configuration of the path M takes: M <= 16, the skinny kernel (block_m is 16: x padded to 16 rows);
    M > 16, the GEMM (block_m its row tile). split_k: K slices reduced by a second kernel (1: none)."""
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


# ---------------------------------------------------------------------------------------------------------------
# Layout helpers (pure torch: the reference, the loaders and the model's CPU path use them)


def pack(q: torch.Tensor) -> torch.Tensor:
    """Values 0..15 of shape [K, N] (any integer dtype) -> qweight [K // 8, N] int32; k = 8 * r + j sits in bits
    4j..4j+3 of word r (k % 8 == 0 is the lowest nibble)."""
    assert q.dim() == 2 and q.shape[0] % PACK == 0, q.shape
    assert bool(((q >= 0) & (q <= 15)).all()), "pack takes values 0..15"
    return int_packing.pack(q, 4, 0)


def unpack(qweight: torch.Tensor) -> torch.Tensor:
    """qweight [K // 8, N] int32 -> nibbles [K, N] int32 (0..15)."""
    return int_packing.unpack(qweight, 4, 0)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """w [K, N] in scales' dtype: (q - zeros[k // G]) * scales[k // G], computed in fp32, rounded once."""
    _check_groups(qweight.shape[0] * PACK, group_size, scales, zeros, qweight.shape[1])
    return int_packing.dequantize(qweight, scales, zeros, group_size, 4)


def w4a16_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize in fp32, matmul in fp32, cast to x.dtype."""
    q = unpack(qweight).float()
    s = scales.float().repeat_interleave(group_size, dim=0)
    z = zeros.float().repeat_interleave(group_size, dim=0)
    y = x.float() @ ((q - z) * s)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _check_groups(K: int, group_size: int, scales: torch.Tensor, zeros: torch.Tensor, N: int) -> None:
    assert group_size > 0 and group_size % PACK == 0 and K % group_size == 0, (K, group_size)
    assert scales.shape == (K // group_size, N) and zeros.shape == scales.shape, (scales.shape, zeros.shape)


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _unpack_tile(words, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, MAGIC: tl.constexpr,
                 DTYPE: tl.constexpr):
    """[BLOCK_K // 8, BLOCK_N] int32 words -> [BLOCK_K, BLOCK_N] of OFFSET + q in DTYPE (k = 8 * row + j)."""
    shifts = tl.arange(0, 8) * 4
    q = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # mask after the (arithmetic) shift
    q = tl.reshape(q, [BLOCK_K, BLOCK_N])
    if MAGIC != 0:
        w = (q | MAGIC).to(tl.int16).to(DTYPE, bitcast=True)  # exactly OFFSET + q, no int-to-float
    else:
        w = q.to(DTYPE)
    return w


@triton.jit
def _word_tiles(qw_ptr, pid_n, pid_k, N, K, stride_qk, tiles_per_split, IDX64: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A split-K program's columns and K range, and the pointers of its first [BLOCK_K / 8, BLOCK_N] word
    tile: (offs_n, mask_n, cols (int64 where IDX64), k_start, k_end, qw_ptrs)."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    cols = offs_n
    k_start = pid_k * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_start + tiles_per_split * BLOCK_K, K)
    word_rows = k_start // 8 + tl.arange(0, BLOCK_K // 8)
    if IDX64:
        cols = cols.to(tl.int64)
        word_rows = word_rows.to(tl.int64)
    return offs_n, mask_n, cols, k_start, k_end, qw_ptr + word_rows[:, None] * stride_qk + cols[None, :]


@triton.jit(do_not_specialize=["M", "G", "tiles_per_split"])
def _w4a16_skinny_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, G,
    stride_xm, stride_qk, stride_sg, stride_zg,
    stride_os, stride_om,
    tiles_per_split,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MAGIC: tl.constexpr, OFFSET: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_K // 8)
    mask_m = offs_m < M
    offs_n, mask_n, cols, k_start, k_end, qw_ptrs = _word_tiles(qw_ptr, pid_n, pid_k, N, K, stride_qk,
                                                                tiles_per_split, IDX64, BLOCK_N, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):  # empty for an empty split: its partial stays 0
        if EVEN_K:
            words = tl.load(qw_ptrs, mask=mask_n[None, :], other=0)
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        else:  # one group (G == K) and a ragged last tile: rows past K read as zero weight and zero x
            words = tl.load(qw_ptrs, mask=((k0 + offs_r * 8) < K)[:, None] & mask_n[None, :], other=0)
            x = tl.load(x_ptrs, mask=mask_m[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
        g = k0 // G  # the tile lies inside one group
        s = tl.load(s_ptr + g * stride_sg + cols, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * stride_zg + cols, mask=mask_n, other=0.0).to(tl.float32)
        w = _unpack_tile(words, BLOCK_K, BLOCK_N, MAGIC, x_ptr.dtype.element_ty)  # OFFSET + q, exact
        d = tl.dot(x, w, input_precision=DOT_PRECISION)  # sum_k x (OFFSET + q), fp32
        x_sum = tl.sum(x.to(tl.float32), axis=1)
        acc += d * s[None, :] - x_sum[:, None] * ((z + OFFSET) * s)[None, :]
        qw_ptrs += (BLOCK_K // 8) * stride_qk
        x_ptrs += BLOCK_K

    store_rows(acc, out_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, pid_k, stride_os, stride_om, HAS_BIAS, SPLIT)


@triton.jit(do_not_specialize=["G", "tiles_per_split"])
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    N, K, G,
    stride_qk, stride_sg, stride_zg, stride_os,
    tiles_per_split,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """M = 1 (batch-1 decode): no tensor core and no layout change. Nibble j of word row r is input
    k0 + 8r + j, so for each j the tile's nibbles meet x at k0 + 8r + j (a stride-8 read of x, which sits
    in L1) in the layout the words were loaded in: every tensor here is [R, BLOCK_N] or a slice of it, so
    nothing goes through shared memory (a [1, R, BLOCK_N] form of this cost a layout conversion and a
    barrier per field). A nibble costs a shift, one and-or (it lands in bits 16-19 of the float 128.0,
    making exactly 128 + q) and one FMA; the 128 comes off with the zero point, once per tile. The [R,
    BLOCK_N] accumulator is scaled once per tile (a tile lies in one group) and summed over R at the end."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    R: tl.constexpr = BLOCK_K // 8
    offs_r = tl.arange(0, R)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n, mask_n, cols, k_start, k_end, qw_ptrs = _word_tiles(qw_ptr, pid_n, pid_k, N, K, stride_qk,
                                                                tiles_per_split, IDX64, BLOCK_N, BLOCK_K)
    acc = tl.zeros([R, BLOCK_N], dtype=tl.float32)
    acc_off = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):  # empty for an empty split: its partial stays 0
        words = tl.load(qw_ptrs, mask=mask_n[None, :], other=0)
        g = k0 // G
        s = tl.load(s_ptr + g * stride_sg + cols, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * stride_zg + cols, mask=mask_n, other=0.0).to(tl.float32)
        x_sum = tl.sum(tl.load(x_ptr + k0 + offs_k).to(tl.float32), axis=0)
        tile = tl.zeros([R, BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(8):
            if j < 4:
                bits = (words << (16 - 4 * j)) & 0xF0000
            elif j == 4:
                bits = words & 0xF0000
            else:
                bits = (words >> (4 * j - 16)) & 0xF0000  # the sign bits land above bit 19 and are masked
            w = (bits | 0x43000000).to(tl.float32, bitcast=True)  # 128 + q, exact
            xj = tl.load(x_ptr + k0 + offs_r * 8 + j).to(tl.float32)
            tile += xj[:, None] * w
        acc += tile * s[None, :]
        acc_off += x_sum * ((z + 128.0) * s)
        qw_ptrs += R * stride_qk

    out = tl.sum(acc, axis=0) - acc_off
    store_row(out, out_ptr, b_ptr, offs_n, mask_n, pid_k, stride_os, HAS_BIAS, SPLIT)


@triton.jit(do_not_specialize=["M", "G", "stride_ps", "tiles_per_split", "split_k"])
def _w4a16_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr,
    M, N, K, G,
    stride_xm, stride_qk, stride_sg, stride_zg, stride_om,
    stride_ps, stride_pm,
    tiles_per_split, split_k,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    MAGIC: tl.constexpr, OFFSET: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_K // 8)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_k * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_start + tiles_per_split * BLOCK_K, K)
    rows = offs_m
    cols = offs_n
    word_rows = k_start // 8 + offs_r
    if IDX64:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
        word_rows = word_rows.to(tl.int64)

    qw_ptrs = qw_ptr + word_rows[:, None] * stride_qk + cols[None, :]
    x_ptrs = x_ptr + rows[:, None] * stride_xm + (k_start + offs_k)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):  # empty for an empty split: its partial stays 0
        if EVEN_K:
            words = tl.load(qw_ptrs, mask=mask_n[None, :], other=0)
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        else:
            words = tl.load(qw_ptrs, mask=((k0 + offs_r * 8) < K)[:, None] & mask_n[None, :], other=0)
            x = tl.load(x_ptrs, mask=mask_m[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
        g = k0 // G
        s = tl.load(s_ptr + g * stride_sg + cols, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * stride_zg + cols, mask=mask_n, other=0.0).to(tl.float32)
        q = _unpack_tile(words, BLOCK_K, BLOCK_N, MAGIC, x_ptr.dtype.element_ty).to(tl.float32)
        w = q * s[None, :] - ((z + OFFSET) * s)[None, :]  # one FMA a weight: (OFFSET + q - OFFSET - z) * s
        acc = tl.dot(x, w.to(x_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)
        qw_ptrs += (BLOCK_K // 8) * stride_qk
        x_ptrs += BLOCK_K

    mask = mask_m[:, None] & mask_n[None, :]
    if split_k > 1:  # a runtime branch, not a constexpr: the split count depends on M
        tl.store(part_ptr + pid_k * stride_ps + rows[:, None] * stride_pm + offs_n[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launch policy and wrapper


def _block_k(K: int, G: int, cap: int) -> int:
    """Largest power of two <= cap, >= 16 (tl.dot's minimum), whose tiles stay inside one group: it divides G, or
    G == K (one group; a ragged last tile is masked)."""
    b = cap
    while b > 16 and G % b != 0 and G != K:
        b //= 2
    if G != K:
        assert G % b == 0, f"group size {G} needs a multiple of 16 (or one group per column)"
    return max(16, min(b, _utils.next_pow2(K)))


def default_config(M: int, N: int, K: int, G: int, device: torch.device,
                   dtype: torch.dtype = torch.bfloat16) -> W4A16Config:
    """The launch configuration for y[M, N] = x[M, K] @ w[K, N], group size G. Every constexpr comes from (N, K,
    G, dtype) and the path (M <= 16: skinny, else GEMM), so a batch size never compiles a variant of its own; M
    only sets the GEMM's split count, a runtime argument.

    Skinny (decode, weight streaming):
    - BLOCK_N = 128: a tile row is 128 words = 512 contiguous bytes (4 whole 128-byte lines), as gemv.py's rows.
    - BLOCK_K = min(G, 128), a divisor of G (one scale/zero row per tile): an 8 KiB tile of 16 word rows.
    - SPLIT_K: doubled while the grid has < 4 programs per SM and every split keeps >= 32 KiB of packed weight
      (4 tiles: pipeline prologue and fp32 partials stay small); the N = 4096 layers need it, gate_up little.
    - num_warps 8: the unpack (16384 nibbles a tile) is the ALU work; 64 nibbles a thread, 16 warps per SM.
    - num_stages 4: 4 tiles (32 KiB) in flight per program, 2 programs per SM (~80 KiB of shared memory each),
      against the ~35 KiB per SM that 4.8 TB/s x ~1 us of latency over 132 SMs needs.
    GEMM (M > 16: decode batches, then prefill):
    - BLOCK_M = 64: little waste at batch 17-64, where the layer is still mostly a weight stream; prefill pays
      one weight-tile dequantization per 64 rows (128 would halve that but double the MMA work at batch <= 64).
    - BLOCK_N = 128: 64 x 128 fp32 accumulator (64 registers a thread at 4 warps), one wgmma warpgroup tile.
    - BLOCK_K = min(G, 64), a divisor of G: the 64 x 128 dequantized tile stays small in registers.
    - num_warps 4, num_stages 4: one warpgroup; 4 stages of 8 KiB x + 4 KiB words.
    - split_k (runtime): doubled (up to 16) while the grid has fewer programs than SMs and every split keeps
      >= 32 KiB of packed weight: at batch 64 o_proj has 32 column blocks and takes 8 splits; prefill none.
    """
    assert M >= 1 and K % G == 0
    sms = _utils.num_sms(device) if device.type == "cuda" else 4
    block_n = max(16, min(128, _utils.next_pow2(N)))
    gemv_k = _block_k(K, G, 128)
    if M == 1 and K % gemv_k == 0 and gemv_k >= 32:
        # GEMV (sweep on an H200, Llama-3-8B shapes at G = 128: 4 warps and 2 stages won everywhere; splits
        # until the grid holds >= 512 programs, at most 16: 1.1-1.4x bf16 cuBLAS, where the padded dot lost).
        split = 1
        while triton.cdiv(N, block_n) * split < _GEMV_PROGRAMS and split < 16 and K // gemv_k >= 4 * split:
            split *= 2
        return W4A16Config(1, block_n, gemv_k, split, 4, 2)
    if M <= MAX_SKINNY_M:
        block_k = _block_k(K, G, 128)
        split = _split(triton.cdiv(N, block_n), triton.cdiv(K, block_k), block_k * block_n // 2,
                       _PROGRAMS_PER_SM * sms)
        return W4A16Config(MAX_SKINNY_M, block_n, block_k, split, 8, 4)
    block_m, block_k = 64, _block_k(K, G, 64)
    programs = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    split = min(_MAX_GEMM_SPLIT, _split(programs, triton.cdiv(K, block_k), block_k * block_n // 2, sms))
    return W4A16Config(block_m, block_n, block_k, split, 4, 4)


def _split(programs: int, k_tiles: int, tile_bytes: int, target: int) -> int:
    """Powers of two (they divide the Llama K's tile counts evenly): doubled while the grid is below `target`
    programs and each split keeps >= _MIN_SPLIT_BYTES of packed weight."""
    min_tiles = max(1, _MIN_SPLIT_BYTES // tile_bytes)
    split = 1
    while programs * split < target and k_tiles // (2 * split) >= min_tiles:
        split *= 2
    return split


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, bias: torch.Tensor | None = None,
                 config: W4A16Config | tuple | None = None) -> torch.Tensor:
    """y = x @ dequantize(qweight, scales, zeros, group_size) (+ bias): x [M, K] (unit last stride, any row
    stride), qweight [K // 8, N] int32, scales and zeros [K // G, N] in x.dtype, bias [N] or None. Returns y
    [M, N] (contiguous) in x.dtype; fp32 accumulation. `config` overrides default_config (tests, sweeps)."""
    assert x.dim() == 2 and qweight.dim() == 2 and qweight.dtype == torch.int32, (x.shape, qweight.dtype)
    M, K = x.shape
    N = qweight.shape[1]
    assert qweight.shape[0] * PACK == K, (x.shape, qweight.shape)
    _check_groups(K, group_size, scales, zeros, N)
    assert x.stride(-1) == 1 and qweight.stride(-1) == 1 and scales.stride(-1) == 1 and zeros.stride(-1) == 1
    assert scales.dtype == x.dtype and zeros.dtype == x.dtype, (x.dtype, scales.dtype, zeros.dtype)
    if bias is not None:
        assert bias.shape == (N,) and bias.stride(0) == 1
    y = _utils.empty((M, N), x.dtype, x.device)
    if M == 0 or N == 0:
        return y
    cfg = W4A16Config(*(config or default_config(M, N, K, group_size, x.device, x.dtype)))
    assert cfg.block_k >= 16 and cfg.block_n >= 16 and cfg.block_m >= 1 and cfg.split_k >= 1, cfg
    assert group_size % cfg.block_k == 0 or group_size == K, "a K tile must stay inside one group"
    magic, offset = _MAGIC[x.dtype]
    common = dict(
        HAS_BIAS=bias is not None, EVEN_K=K % cfg.block_k == 0,
        IDX64=_utils.needs_int64(qweight, scales, zeros) or M * max(x.stride(0), N) >= 2**31 - 1,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, MAGIC=magic, OFFSET=offset,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # tf32 is the default (ignored for 16-bit)
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if cfg.block_m < MAX_SKINNY_M:
        _gemv(x, qweight, scales, zeros, group_size, bias, y, cfg, common)
        return y
    launch = _skinny if M <= MAX_SKINNY_M else _gemm
    launch(x, qweight, scales, zeros, group_size, bias, y, cfg, common)
    return y


def _gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, G: int,
          bias: torch.Tensor | None, y: torch.Tensor, cfg: W4A16Config, common: dict) -> None:
    M, K = x.shape
    N = y.shape[1]
    assert M == 1 and cfg.block_m == 1 and K % cfg.block_k == 0, (M, K, cfg)
    tiles_per_split = triton.cdiv(K // cfg.block_k, cfg.split_k)
    grid = (triton.cdiv(N, cfg.block_n), cfg.split_k)
    args = (x, qweight, scales, zeros, bias if bias is not None else y)
    strides = (qweight.stride(0), scales.stride(0), zeros.stride(0))
    opts = dict(HAS_BIAS=common["HAS_BIAS"], IDX64=common["IDX64"], BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.split_k == 1:
        _w4a16_gemv_kernel[grid](*args, y, N, K, G, *strides, 0, tiles_per_split, SPLIT=False, **opts)
        return
    part = _utils.empty((cfg.split_k, MAX_SKINNY_M, N), torch.float32, x.device)
    _w4a16_gemv_kernel[grid](*args, part, N, K, G, *strides, part.stride(0), tiles_per_split, SPLIT=True, **opts)
    _reduce(part, bias, y, cfg.split_k, _utils.next_pow2(cfg.split_k))


def _skinny(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, G: int,
            bias: torch.Tensor | None, y: torch.Tensor, cfg: W4A16Config, common: dict) -> None:
    M, K = x.shape
    N = y.shape[1]
    assert cfg.block_m == MAX_SKINNY_M, cfg
    tiles_per_split = triton.cdiv(triton.cdiv(K, cfg.block_k), cfg.split_k)
    grid = (triton.cdiv(N, cfg.block_n), cfg.split_k)
    args = (x, qweight, scales, zeros, bias if bias is not None else y)  # y: a dummy bias pointer, never read
    strides = (x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0))
    if cfg.split_k == 1:
        _w4a16_skinny_kernel[grid](*args, y, M, N, K, G, *strides, 0, y.stride(0), tiles_per_split,
                                   SPLIT=False, BLOCK_M=MAX_SKINNY_M, **common)
        return
    # Partials are [split, 16, N] whatever M is: their strides depend on the shape only (one compiled variant).
    part = _utils.empty((cfg.split_k, MAX_SKINNY_M, N), torch.float32, x.device)
    _w4a16_skinny_kernel[grid](*args, part, M, N, K, G, *strides, part.stride(0), part.stride(1), tiles_per_split,
                               SPLIT=True, BLOCK_M=MAX_SKINNY_M, **common)
    _reduce(part, bias, y, cfg.split_k, _utils.next_pow2(cfg.split_k))


def _gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, G: int,
          bias: torch.Tensor | None, y: torch.Tensor, cfg: W4A16Config, common: dict) -> None:
    M, K = x.shape
    N = y.shape[1]
    assert cfg.split_k <= _MAX_GEMM_SPLIT, cfg
    tiles_per_split = triton.cdiv(triton.cdiv(K, cfg.block_k), cfg.split_k)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), cfg.split_k)
    # [split, M rounded up to 16, N] fp32 partials (the split stride stays a multiple of 16 elements, so the
    # reduction, which specialises on it, compiles once), or a 1-element fp32 stand-in that is never written: the
    # pointer's dtype is part of the GEMM's signature, so it stays fp32 whatever the split (M) is.
    rows = triton.cdiv(M, MAX_SKINNY_M) * MAX_SKINNY_M
    part = _utils.empty((cfg.split_k, rows, N) if cfg.split_k > 1 else (1,), torch.float32, x.device)
    _w4a16_gemm_kernel[grid](
        x, qweight, scales, zeros, bias if bias is not None else y, y, part, M, N, K, G,
        x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), y.stride(0),
        part.stride(0) if cfg.split_k > 1 else 0, N, tiles_per_split, cfg.split_k,
        BLOCK_M=cfg.block_m, GROUP_M=8, **common)
    if cfg.split_k > 1:  # one BLOCK_S for every split count: the reduction compiles once, whatever M is
        _reduce(part, bias, y, cfg.split_k, _MAX_GEMM_SPLIT)


def _reduce(part: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, split: int, block_s: int) -> None:
    """y[m] = sum of the split partials (fixed order) + bias, cast: gemv.py's reduction kernel."""
    M, N = y.shape
    _gemv_reduce_kernel[(triton.cdiv(N, _REDUCE_BLOCK), M)](
        part, bias if bias is not None else y, y, N, part.stride(0), part.stride(1), y.stride(0), split,
        HAS_BIAS=bias is not None, BLOCK_S=block_s, BLOCK=_REDUCE_BLOCK, num_warps=4,
    )
