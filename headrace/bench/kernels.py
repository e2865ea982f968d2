"""Kernel micro-benchmarks on the current device, judged against ceilings measured in the same run.

- paged decode attention, B sequences x C context tokens: achieved bytes/s (K and V read once, q and
  out) over the measured copy bandwidth;
- paged prefill attention, one causal prompt of T tokens: achieved FLOP/s (4 x heads x head_dim per
  visible query-key pair) over the measured matmul rate, next to torch's SDPA on the same data; two
  variants: "paged" (every key read through the block table) and "new K/V contiguous" (the step's own
  keys and values passed as k_new / v_new, [T, kv_heads, head_dim], the block table only for a prefix);
- seeded random sampling (CUDA only), B rows x V logits: the fused hash + Gumbel-argmax kernel next to the
  sampler's torch path (hash_uniform + log + argmax); bytes/s of float32 logits read, and the speedup;
- small-M GEMV (`--gemv`, CUDA only): Llama-3-8B's five decode GEMMs (QKV, o_proj, gate_up, down, LM head) at
  M rows (`--gemv-batch`), ours next to torch.nn.functional.linear (cuBLAS); weight bytes/s, fraction of copy
  bandwidth. Each shape cycles through enough weight copies (>= 256 MiB) that no weight is read from L2, as in a
  real forward pass where every layer has its own weights.
- W4A16 matmul (`--w4a16`, CUDA only): Llama-3-8B's four linear layers (QKV, o_proj, gate_up, down) with 4-bit
  weights, group size 128, at M rows (`--w4a16-batch`), ours next to bf16 torch.nn.functional.linear (cuBLAS);
  bytes/s of the quantized weight streamed (packed nibbles + scales + zeros), fraction of copy bandwidth, speed
  over bf16 and max relative error against the fp32 reference. Weights cycled as for --gemv.
- fused MoE (`--moe`, CUDA only): one MoE layer of `--moe-model` (Mixtral-8x7B's 8 experts of 4096 x 14336, top 2,
  by default) at B tokens (`--moe-batch`) with a random routing; bytes/s over the weights of the experts the
  routing touches (each read once: gate|up and down), fraction of copy bandwidth, next to the torch loop over
  experts (the CPU path); with --sweep, a grid of block sizes per batch.
Each kernel's output is also checked against a reference (relative error, or token agreement, reported).

    python -m headrace.bench.kernels --decode-batch 1 64 --decode-context 2048 --prefill-tokens 4096 \
        --sampling-batch 1 256 --gemv --gemv-batch 1 4 --w4a16 --w4a16-batch 1 16 64 256 --output-json kernels.json
    python -m headrace.bench.kernels --decode-batch --prefill-tokens --sampling-batch --moe --moe-batch 1 64

Shapes default to Llama-3-8B's attention: 32 query heads, 8 KV heads, head_dim 128, block size 16, bf16.
Run it as a module (`-m`): run as a file, its own name would shadow the top-level `kernels` package.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from headrace.bench import roofline
from headrace.kernels.paged_decode_attention import (
    default_num_kv_splits,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from headrace.kernels.fused_moe import MoeConfig, fused_moe
from headrace.kernels.fused_moe import default_config as moe_default_config
from headrace.kernels.fused_moe_ref import fused_moe_reference
from headrace.kernels.gemv import default_config as gemv_default_config
from headrace.kernels.gemv import gemv, gemv_ref
from headrace.kernels.prefill_attention import paged_prefill_attention
from headrace.kernels.w4a16_matmul import default_config as w4a16_default_config
from headrace.kernels.w4a16_matmul import w4a16_matmul, w4a16_matmul_reference
from headrace.kernels.sampling import hash_gumbel_argmax
from headrace.services.gpu_worker.sampler import gumbel_argmax_


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def random_paged_kv(num_tokens_per_seq: list[int], kv_heads: int, head_dim: int, block_size: int,
                    dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Caches holding exactly the sequences' blocks, in a random physical order; block tables [S, max]."""
    per_seq = [-(-n // block_size) for n in num_tokens_per_seq]
    num_blocks = sum(per_seq)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks, device=device).to(torch.int32)
    tables = torch.zeros(len(per_seq), max(per_seq), dtype=torch.int32, device=device)
    start = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = perm[start : start + n]
        start += n
    return k_cache, v_cache, tables


def decode_inputs(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, block_size: int,
                  dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(q, k_cache, v_cache, block_tables, seq_lens) for `batch` sequences of `context` cached tokens."""
    k_cache, v_cache, tables = random_paged_kv([context] * batch, kv_heads, head_dim, block_size, dtype, device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)
    return q, k_cache, v_cache, tables, seq_lens


def decode_bytes(q: torch.Tensor, k_cache: torch.Tensor, context: int) -> int:
    """Bytes a decode step moves: every K and V of the batch read once, q read and out written."""
    batch, _, head_dim = q.shape
    elem = k_cache.element_size()
    return 2 * batch * context * k_cache.shape[2] * head_dim * elem + 2 * q.numel() * elem


def prefill_inputs(tokens: int, heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, ...]:
    """(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, context_lens) of one uncached prompt."""
    k_cache, v_cache, tables = random_paged_kv([tokens], kv_heads, head_dim, block_size, dtype, device)
    q = torch.randn(tokens, heads, head_dim, device=device, dtype=dtype)
    qsl = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    lens = torch.tensor([tokens], dtype=torch.int32, device=device)
    ctx = torch.zeros(1, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, tables, qsl, lens, ctx


def prefill_new_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                   tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's keys and values gathered out of the cache into contiguous [T, kv_heads, head_dim]
    tensors: the k_new / v_new of the contiguous prefill variant (what rope_and_cache's inputs hold)."""
    pos = torch.arange(tokens, device=k_cache.device)
    blocks, offs = block_tables[0, pos // k_cache.shape[1]].long(), pos % k_cache.shape[1]
    return k_cache[blocks, offs].contiguous(), v_cache[blocks, offs].contiguous()


def prefill_flops(tokens: int, heads: int, head_dim: int) -> float:
    return 4 * heads * head_dim * tokens * (tokens + 1) / 2  # QK^T and PV over the causal half


def bench_decode(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, copy_bytes_per_s: float, reps: int,
                 window: int | None = None) -> dict:
    """`window`: a sliding-window layer's decode (bytes counted over the keys inside the window), with the
    split count the backend picks for it."""
    q, k_cache, v_cache, tables, seq_lens = decode_inputs(batch, context, heads, kv_heads, head_dim, block_size,
                                                          dtype, device)
    scale = head_dim ** -0.5
    splits = default_num_kv_splits(batch, kv_heads, head_dim, min(tables.shape[1] * block_size, window or context),
                                   device)
    err = rel_err(paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, scale, splits, window=window),
                  paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, scale, window=window))
    seconds = roofline.time_median(
        lambda: paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, scale, splits, window=window),
        device, reps)
    nbytes = decode_bytes(q, k_cache, min(context, window or context))
    return {"kernel": "paged_decode_attention", "batch": batch, "context": context, "window": window,
            "num_kv_splits": splits,
            "time_us": seconds * 1e6, "bytes": nbytes, "gb_per_s": nbytes / seconds / 1e9,
            "fraction_of_copy_bandwidth": nbytes / seconds / copy_bytes_per_s, "rel_err": err}


def bench_prefill(tokens: int, heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                  device: torch.device, matmul_flops_per_s: float, reps: int) -> dict:
    """Both prefill variants and SDPA on one prompt. The paged variant keeps the original field names;
    the contiguous one (k_new / v_new) is reported under "new_kv"."""
    q, k_cache, v_cache, tables, qsl, lens, ctx = prefill_inputs(tokens, heads, kv_heads, head_dim, block_size,
                                                                 dtype, device)
    scale = head_dim ** -0.5
    k_new, v_new = prefill_new_kv(k_cache, v_cache, tables, tokens)

    def ours():
        return paged_prefill_attention(q, k_cache, v_cache, tables, qsl, lens, ctx, tokens, scale)

    def ours_new_kv():
        return paged_prefill_attention(q, k_cache, v_cache, tables, qsl, lens, ctx, tokens, scale,
                                       k_new=k_new, v_new=v_new)

    # The same keys, [1, heads, T, D], for torch's fused attention.
    k, v = k_new.transpose(0, 1)[None].contiguous(), v_new.transpose(0, 1)[None].contiguous()
    qt = q.transpose(0, 1)[None].contiguous()

    def sdpa():
        return F.scaled_dot_product_attention(qt, k, v, is_causal=True, scale=scale, enable_gqa=True)

    want = sdpa()[0].transpose(0, 1)
    err, err_new = rel_err(ours(), want), rel_err(ours_new_kv(), want)
    seconds = roofline.time_median(ours, device, reps)
    new_seconds = roofline.time_median(ours_new_kv, device, reps)
    sdpa_seconds = roofline.time_median(sdpa, device, reps)
    flops = prefill_flops(tokens, heads, head_dim)
    return {"kernel": "paged_prefill_attention", "tokens": tokens, "time_us": seconds * 1e6, "flops": flops,
            "tflops": flops / seconds / 1e12, "fraction_of_matmul_rate": flops / seconds / matmul_flops_per_s,
            "sdpa_time_us": sdpa_seconds * 1e6, "sdpa_tflops": flops / sdpa_seconds / 1e12,
            "ours_over_sdpa": sdpa_seconds / seconds, "rel_err_vs_sdpa": err,
            "new_kv": {"time_us": new_seconds * 1e6, "tflops": flops / new_seconds / 1e12,
                       "fraction_of_matmul_rate": flops / new_seconds / matmul_flops_per_s,
                       "ours_over_sdpa": sdpa_seconds / new_seconds, "speedup_over_paged": seconds / new_seconds,
                       "rel_err_vs_sdpa": err_new}}


def bench_sampling(batch: int, vocab: int, device: torch.device, copy_bytes_per_s: float, reps: int) -> dict:
    x = 3 * torch.randn(batch, vocab, device=device)
    x[:, ::7] = float("-inf")  # filtered tokens (top-k / top-p / min-p leave -inf behind)
    seeds = torch.randint(-(2**63), 2**63 - 1, (batch,), device=device)
    steps = torch.randint(0, 4096, (batch,), device=device)
    ours = hash_gumbel_argmax(x, seeds, steps)
    agree = float((ours == gumbel_argmax_(x.clone(), seeds, steps)).float().mean()) if batch else 1.0
    scratch = x.clone()  # the torch path overwrites its input (as in the sampler, where x is a temporary)
    seconds = roofline.time_median(lambda: hash_gumbel_argmax(x, seeds, steps), device, reps)
    torch_seconds = roofline.time_median(lambda: gumbel_argmax_(scratch, seeds, steps), device, reps)
    nbytes = x.numel() * x.element_size()  # logits read once; seeds, steps and ids are noise
    return {"kernel": "hash_gumbel_argmax", "batch": batch, "vocab": vocab, "time_us": seconds * 1e6,
            "bytes": nbytes, "gb_per_s": nbytes / seconds / 1e9,
            "fraction_of_copy_bandwidth": nbytes / seconds / copy_bytes_per_s,
            "torch_time_us": torch_seconds * 1e6, "torch_gb_per_s": nbytes / torch_seconds / 1e9,
            "ours_over_torch": torch_seconds / seconds, "token_agreement": agree}


DECODE_SWEEP = [(bn, w, st) for bn in (16, 32, 64, 128) for w in (2, 4, 8) for st in (2, 3, 4)]
DECODE_SWEEP_SPLITS = (1, 2, 3, 4, 6, 8, 16)
PREFILL_SWEEP = [(bm, bn, w, st) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3)]
# The contiguous variant's loads are cheaper to pipeline: deeper pipelines too (those that do not fit the shared
# memory fail to launch and are reported as errors).
PREFILL_NEW_KV_SWEEP = [(bm, bn, w, st) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8)
                        for st in (2, 3, 4)]


def sweep_decode(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, copy_bytes_per_s: float, reps: int) -> dict:
    """Every (split count, BLOCK_N, warps, stages) of a small grid at one shape, fastest first: the data
    the launch policy (`_config`, `_split_policy`) is tuned from."""
    q, k_cache, v_cache, tables, seq_lens = decode_inputs(batch, context, heads, kv_heads, head_dim, block_size,
                                                          dtype, device)
    scale = head_dim ** -0.5
    default = default_num_kv_splits(batch, kv_heads, head_dim, tables.shape[1] * block_size, device)
    nbytes = decode_bytes(q, k_cache, context)
    rows = []
    for splits in sorted({default, *DECODE_SWEEP_SPLITS}):
        for cfg in DECODE_SWEEP:
            try:
                sec = roofline.time_median(lambda: paged_decode_attention(
                    q, k_cache, v_cache, tables, seq_lens, scale, splits, cfg), device, reps)
            except Exception as e:  # noqa: BLE001 - a config may not fit the SM's shared memory
                rows.append({"splits": splits, "config": cfg, "error": type(e).__name__})
                continue
            rows.append({"splits": splits, "config": cfg, "time_us": sec * 1e6,
                         "fraction_of_copy_bandwidth": nbytes / sec / copy_bytes_per_s})
    ok = sorted((r for r in rows if "time_us" in r), key=lambda r: r["time_us"])
    return {"kernel": "paged_decode_attention_sweep", "batch": batch, "context": context,
            "default_splits": default, "best": ok[:5], "tried": len(rows)}


def sweep_prefill(tokens: int, heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                  device: torch.device, matmul_flops_per_s: float, reps: int, variant: str = "paged") -> dict:
    """Every (BLOCK_M, BLOCK_N, warps, stages) of a grid at one prompt length, fastest first, for one variant:
    "paged" (PREFILL_SWEEP) or "new_kv" (k_new / v_new given, PREFILL_NEW_KV_SWEEP)."""
    q, k_cache, v_cache, tables, qsl, lens, ctx = prefill_inputs(tokens, heads, kv_heads, head_dim, block_size,
                                                                 dtype, device)
    new_kv = {}
    if variant == "new_kv":
        k_new, v_new = prefill_new_kv(k_cache, v_cache, tables, tokens)
        new_kv = {"k_new": k_new, "v_new": v_new}
    elif variant != "paged":
        raise ValueError(f"unknown prefill variant {variant!r}")
    flops = prefill_flops(tokens, heads, head_dim)
    rows = []
    for cfg in PREFILL_NEW_KV_SWEEP if new_kv else PREFILL_SWEEP:
        try:
            sec = roofline.time_median(lambda: paged_prefill_attention(
                q, k_cache, v_cache, tables, qsl, lens, ctx, tokens, head_dim ** -0.5, cfg, **new_kv), device, reps)
        except Exception as e:  # noqa: BLE001
            rows.append({"config": cfg, "error": type(e).__name__})
            continue
        rows.append({"config": cfg, "time_us": sec * 1e6, "tflops": flops / sec / 1e12,
                     "fraction_of_matmul_rate": flops / sec / matmul_flops_per_s})
    ok = sorted((r for r in rows if "time_us" in r), key=lambda r: r["time_us"])
    name = "paged_prefill_attention_new_kv_sweep" if new_kv else "paged_prefill_attention_sweep"
    return {"kernel": name, "variant": variant, "tokens": tokens, "best": ok[:5], "tried": len(rows)}


# Llama-3-8B's decode GEMMs, (name, N, K): y[M, N] = x[M, K] @ w[N, K].T.
GEMV_SHAPES = [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
               ("lm_head", 128256, 4096)]
_GEMV_ROTATE_BYTES = 256 << 20  # weight copies cycled per shape: 5x an H100's 50 MB L2


def gemv_inputs(batch: int, n: int, k: int, dtype: torch.dtype, device: torch.device
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x [batch, K] and as many [N, K] weights as it takes to cycle through >= 256 MiB (each read from HBM;
    at most 64 copies)."""
    nbytes = n * k * roofline.dtype_bytes(dtype)
    copies = max(1, min(64, -(-_GEMV_ROTATE_BYTES // nbytes)))
    x = torch.randn(batch, k, device=device, dtype=dtype)
    return x, [(torch.randn(n, k, device=device, dtype=dtype) / k**0.5) for _ in range(copies)]


def _cycling(fn, ws: list[torch.Tensor]):
    """A no-argument callable running fn(w) on the next weight copy each call."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(ws)
        return fn(ws[state["i"]])
    return call


def bench_gemv(batch: int, name: str, n: int, k: int, dtype: torch.dtype, device: torch.device,
               copy_bytes_per_s: float, reps: int) -> dict:
    x, ws = gemv_inputs(batch, n, k, dtype, device)
    cfg = gemv_default_config(batch, n, k, device, dtype)
    err = rel_err(gemv(x, ws[0], None, cfg), gemv_ref(x, ws[0]))
    seconds = roofline.time_median(_cycling(lambda w: gemv(x, w, None, cfg), ws), device, reps)
    torch_seconds = roofline.time_median(_cycling(lambda w: F.linear(x, w), ws), device, reps)
    nbytes = n * k * roofline.dtype_bytes(dtype)  # the weight; x and y are noise
    return {"kernel": "gemv", "name": name, "batch": batch, "n": n, "k": k, "config": list(cfg),
            "programs": -(-n // cfg[0]) * cfg[2], "weight_copies": len(ws),
            "time_us": seconds * 1e6, "bytes": nbytes, "gb_per_s": nbytes / seconds / 1e9,
            "fraction_of_copy_bandwidth": nbytes / seconds / copy_bytes_per_s,
            "cublas_time_us": torch_seconds * 1e6, "cublas_gb_per_s": nbytes / torch_seconds / 1e9,
            "cublas_fraction_of_copy_bandwidth": nbytes / torch_seconds / copy_bytes_per_s,
            "ours_over_cublas": torch_seconds / seconds, "rel_err": err}


# (BLOCK_N, BLOCK_K, num_warps, num_stages); each is tried at the default split count, half and double it, and 1.
GEMV_SWEEP = [(bn, bk, w, st) for bn in (16, 32, 64) for bk in (128, 256, 512) for w in (4, 8) for st in (3, 4)]


def sweep_gemv(batch: int, name: str, n: int, k: int, dtype: torch.dtype, device: torch.device,
               copy_bytes_per_s: float, reps: int) -> dict:
    """Every (split count, BLOCK_N, BLOCK_K, warps, stages) of a small grid at one shape, fastest first: the data
    `default_config` should be checked against. Configs that do not fit the shared memory are reported as errors."""
    x, ws = gemv_inputs(batch, n, k, dtype, device)
    default = gemv_default_config(batch, n, k, device, dtype)
    nbytes = n * k * roofline.dtype_bytes(dtype)
    rows = []
    for split in sorted({1, max(1, default[2] // 2), default[2], 2 * default[2]}):
        for bn, bk, warps, stages in GEMV_SWEEP:
            cfg = (bn, bk, split, warps, stages)
            try:
                sec = roofline.time_median(_cycling(lambda w: gemv(x, w, None, cfg), ws), device, reps)
            except Exception as e:  # noqa: BLE001 - a config may not fit the SM's shared memory
                rows.append({"config": list(cfg), "error": type(e).__name__})
                continue
            rows.append({"config": list(cfg), "splits": split, "time_us": sec * 1e6, "gb_per_s": nbytes / sec / 1e9,
                         "fraction_of_copy_bandwidth": nbytes / sec / copy_bytes_per_s})
    ok = sorted((r for r in rows if "time_us" in r), key=lambda r: r["time_us"])
    return {"kernel": "gemv_sweep", "name": name, "batch": batch, "n": n, "k": k, "default_config": list(default),
            "best": ok[:3], "tried": len(rows)}


# Llama-3-8B's linear layers with 4-bit weights, (name, N, K): y[M, N] = x[M, K] @ dequant(qweight [K // 8, N]).
W4A16_SHAPES = [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
W4A16_GROUP = 128


def w4a16_bytes(n: int, k: int, group: int, dtype: torch.dtype) -> int:
    """Weight bytes a W4A16 matmul streams: the packed nibbles plus a scale and a zero per group and column."""
    return n * k // 2 + 2 * (k // group) * n * roofline.dtype_bytes(dtype)


def w4a16_inputs(batch: int, n: int, k: int, group: int, dtype: torch.dtype, device: torch.device
                 ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """x [batch, K] and as many (qweight, scales, zeros) as it takes to cycle through >= 256 MiB (at most 64):
    random nibbles, scales ~ 1 / (8 sqrt(K)) (outputs of order 1), asymmetric integer zeros in 0..15."""
    copies = max(1, min(64, -(-_GEMV_ROTATE_BYTES // w4a16_bytes(n, k, group, dtype))))
    x = torch.randn(batch, k, device=device, dtype=dtype)
    ws = []
    for _ in range(copies):
        qweight = torch.randint(-(2**31), 2**31, (k // 8, n), device=device, dtype=torch.int32)
        scales = ((0.5 + torch.rand(k // group, n, device=device)) / (8 * k**0.5)).to(dtype)
        zeros = torch.randint(0, 16, (k // group, n), device=device).to(dtype)
        ws.append((qweight, scales, zeros))
    return x, ws


def bench_w4a16(batch: int, name: str, n: int, k: int, group: int, dtype: torch.dtype, device: torch.device,
                copy_bytes_per_s: float, reps: int) -> dict:
    x, ws = w4a16_inputs(batch, n, k, group, dtype, device)
    cfg = w4a16_default_config(batch, n, k, group, device, dtype)
    y, ref = w4a16_matmul(x, *ws[0], group, None, cfg), w4a16_matmul_reference(x, *ws[0], group)
    max_rel = float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))
    seconds = roofline.time_median(_cycling(lambda w: w4a16_matmul(x, *w, group, None, cfg), ws), device, reps)
    _, bf16_ws = gemv_inputs(batch, n, k, torch.bfloat16, device)
    x16 = x.to(torch.bfloat16)
    bf16_seconds = roofline.time_median(_cycling(lambda w: F.linear(x16, w), bf16_ws), device, reps)
    nbytes, bf16_bytes = w4a16_bytes(n, k, group, dtype), n * k * 2
    return {"kernel": "w4a16_matmul", "name": name, "batch": batch, "n": n, "k": k, "group_size": group,
            "config": list(cfg), "weight_copies": len(ws), "time_us": seconds * 1e6, "bytes": nbytes,
            "gb_per_s": nbytes / seconds / 1e9, "fraction_of_copy_bandwidth": nbytes / seconds / copy_bytes_per_s,
            "bf16_time_us": bf16_seconds * 1e6, "bf16_bytes": bf16_bytes,
            "bf16_gb_per_s": bf16_bytes / bf16_seconds / 1e9,
            "bf16_fraction_of_copy_bandwidth": bf16_bytes / bf16_seconds / copy_bytes_per_s,
            "ours_over_bf16": bf16_seconds / seconds, "rel_err": rel_err(y, ref), "max_rel_err": max_rel}


def _w4a16_sweep_configs(batch: int, default) -> list[tuple]:
    """Configs around the default, as W4A16Config tuples (block_m, block_n, block_k, split_k, warps, stages):
    the skinny kernel's tiles at the default split, half and double it, and 1; the GEMM's tiles at its default
    split and 1 (block_m 64 or 128; block_k must divide the group size, 128 here)."""
    splits = sorted({1, max(1, default[3] // 2), default[3], 2 * default[3]} if batch <= 16 else {1, default[3]})
    if batch == 1:  # the elementwise GEMV (block_m 1), over more splits: it has no dot to feed
        return [(1, bn, 128, split, w, 2) for split in (2, 4, 8, 16) for bn in (64, 128, 256) for w in (4, 8)]
    if batch <= 16:
        return [(16, bn, bk, split, w, st) for split in splits
                for bn in (64, 128, 256) for bk in (64, 128) for w in (4, 8) for st in (3, 4, 5)]
    return [(bm, bn, bk, split, w, st) for split in splits for bm in (64, 128) for bn in (64, 128, 256)
            for bk in (32, 64, 128) for w in (4, 8) for st in (3, 4)]


def sweep_w4a16(batch: int, name: str, n: int, k: int, group: int, dtype: torch.dtype, device: torch.device,
                copy_bytes_per_s: float, reps: int) -> dict:
    """Every config of `_w4a16_sweep_configs` at one shape, fastest first (errors: configs that do not fit)."""
    x, ws = w4a16_inputs(batch, n, k, group, dtype, device)
    default = w4a16_default_config(batch, n, k, group, device, dtype)
    nbytes = w4a16_bytes(n, k, group, dtype)
    rows = []
    for cfg in _w4a16_sweep_configs(batch, default):
        try:
            sec = roofline.time_median(_cycling(lambda w: w4a16_matmul(x, *w, group, None, cfg), ws), device, reps)
        except Exception as e:  # noqa: BLE001 - a config may not fit the SM's shared memory or registers
            rows.append({"config": list(cfg), "error": type(e).__name__})
            continue
        rows.append({"config": list(cfg), "time_us": sec * 1e6, "gb_per_s": nbytes / sec / 1e9,
                     "fraction_of_copy_bandwidth": nbytes / sec / copy_bytes_per_s})
    ok = sorted((r for r in rows if "time_us" in r), key=lambda r: r["time_us"])
    return {"kernel": "w4a16_sweep", "name": name, "batch": batch, "n": n, "k": k, "default_config": list(default),
            "best": ok[:3], "tried": len(rows)}


def moe_arch(preset: str):
    from headrace.common.models.arch import arch_from_hf_config
    from headrace.common.models.source import resolve_model

    return arch_from_hf_config(resolve_model(f"random:{preset}").hf_config())


def moe_inputs(preset: str, batch: int, dtype: torch.dtype, device: torch.device):
    """One MoE layer of a preset's shape: x [B, H], w13 [E, 2I, H], w2 [E, H, I], and the top-k of random
    router logits (softmax weights renormalised), as the model's router gives them."""
    arch = moe_arch(preset)
    e, h, i, k = arch.num_experts, arch.hidden_size, arch.moe_intermediate_size, arch.num_experts_per_tok
    x = torch.randn(batch, h, device=device, dtype=dtype)
    w13 = torch.randn(e, 2 * i, h, device=device, dtype=dtype) / h ** 0.5
    w2 = torch.randn(e, h, i, device=device, dtype=dtype) / i ** 0.5
    weights, ids = torch.randn(batch, e, device=device).softmax(dim=-1).topk(k, dim=-1)
    return x, w13, w2, weights / weights.sum(dim=-1, keepdim=True), ids


def moe_bytes(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor) -> int:
    """Weights of the experts the routing touches (each read once), plus x read and the output written."""
    touched = ids.unique().numel()
    return touched * (w13[0].numel() + w2[0].numel()) * w13.element_size() + 2 * x.numel() * x.element_size()


def bench_moe(preset: str, batch: int, dtype: torch.dtype, device: torch.device, copy_bytes_per_s: float,
              reps: int, cfg: MoeConfig | None = None, inputs: tuple | None = None) -> dict:
    """The default config (or `cfg`) next to the torch loop; with `inputs` given (a sweep), ours alone."""
    x, w13, w2, weights, ids = inputs or moe_inputs(preset, batch, dtype, device)
    cfg = cfg or moe_default_config(batch, ids.shape[1], w13.shape[0])
    want = fused_moe_reference(x, w13, w2, weights, ids)
    err = rel_err(fused_moe(x, w13, w2, weights, ids, cfg), want)
    seconds = roofline.time_median(lambda: fused_moe(x, w13, w2, weights, ids, cfg), device, reps)
    nbytes = moe_bytes(x, w13, w2, ids)
    row = {"kernel": "fused_moe", "model": preset, "batch": batch, "experts_touched": ids.unique().numel(),
           "config": list(cfg.__dict__.values()), "time_us": seconds * 1e6, "bytes": nbytes,
           "gb_per_s": nbytes / seconds / 1e9, "fraction_of_copy_bandwidth": nbytes / seconds / copy_bytes_per_s,
           "rel_err": err}
    if inputs is None:
        # The torch loop reads each expert's rows back to the host, so the GPU idles between its launches:
        # wall time, which its device time cannot be separated from.
        torch_seconds = roofline.wall_time_median(lambda: fused_moe_reference(x, w13, w2, weights, ids), device,
                                                  reps)
        row.update(torch_loop_time_us=torch_seconds * 1e6, ours_over_torch_loop=torch_seconds / seconds)
    return row


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the MoE sweep.
MOE_SWEEP = [MoeConfig(bm, bn, bk, 4, st) for bm in (16, 32, 64) for bn in (32, 64, 128) for bk in (64, 128)
             for st in (3, 4)]


def sweep_moe(preset: str, batch: int, dtype: torch.dtype, device: torch.device, copy_bytes_per_s: float,
              reps: int) -> dict:
    """Every MoE block configuration of a small grid at one batch, fastest first (failures skipped)."""
    inputs = moe_inputs(preset, batch, dtype, device)
    rows = []
    for cfg in MOE_SWEEP:
        try:
            rows.append(bench_moe(preset, batch, dtype, device, copy_bytes_per_s, reps, cfg, inputs))
        except Exception as e:  # a config that does not fit shared memory
            rows.append({"config": list(cfg.__dict__.values()), "error": str(e)[:200]})
    ok = sorted((r for r in rows if "time_us" in r), key=lambda r: r["time_us"])
    arch = moe_arch(preset)
    default = moe_default_config(batch, arch.num_experts_per_tok, arch.num_experts)
    return {"kernel": "fused_moe_sweep", "model": preset, "batch": batch, "best": ok[:5], "tried": len(rows),
            "default_config": list(default.__dict__.values())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m headrace.bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--decode-batch", type=int, nargs="*", default=[1, 64])
    p.add_argument("--decode-context", type=int, default=2048)
    p.add_argument("--decode-window", type=int, default=None,
                   help="also time each decode batch as a sliding-window layer of this window")
    p.add_argument("--prefill-tokens", type=int, nargs="*", default=[4096])
    p.add_argument("--sampling-batch", type=int, nargs="*", default=[256],
                   help="rows for the sampling kernel (CUDA only; skipped on a CPU)")
    p.add_argument("--sampling-vocab", type=int, default=128256)
    p.add_argument("--num-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU (interpreter)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--gemv", action="store_true",
                   help="also time the small-M GEMV on Llama-3-8B's five decode GEMMs against cuBLAS (CUDA only)")
    p.add_argument("--gemv-batch", type=int, nargs="*", default=[1], help="rows M (<= 16) for --gemv")
    p.add_argument("--w4a16", action="store_true",
                   help="also time the W4A16 matmul (4-bit weights, group 128) on Llama-3-8B's four linear layers "
                        "against bf16 torch.nn.functional.linear (CUDA only)")
    p.add_argument("--w4a16-batch", type=int, nargs="*", default=[1, 16, 64, 256], help="rows M for --w4a16")
    p.add_argument("--moe", action="store_true",
                   help="also time the fused MoE kernel on one layer of --moe-model against the torch loop (CUDA only)")
    p.add_argument("--moe-batch", type=int, nargs="*", default=[1, 64], help="tokens for --moe")
    p.add_argument("--moe-model", default="mixtral-8x7b", help="a random: preset with experts (qwen3-30b-a3b, ...)")
    p.add_argument("--sweep", action="store_true",
                   help="also time a grid of launch configurations per decode/prefill shape (CUDA only); "
                        "prefill: both variants, paged and new K/V contiguous; with --gemv or --w4a16, per shape too")
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    rates = roofline.measure(device, dtype)
    shape = (args.num_heads, args.num_kv_heads, args.head_dim, args.block_size, dtype, device)
    results = [bench_decode(b, args.decode_context, *shape, rates.copy_bytes_per_s, args.reps, window)
               for b in args.decode_batch for window in dict.fromkeys([None, args.decode_window])]
    results += [bench_prefill(t, *shape, rates.matmul_flops_per_s, args.reps) for t in args.prefill_tokens]
    if device.type == "cuda":  # the interpreter would take minutes at a real vocabulary, and says nothing of speed
        results += [bench_sampling(b, args.sampling_vocab, device, rates.copy_bytes_per_s, args.reps)
                    for b in args.sampling_batch]
    if args.sweep and device.type == "cuda":
        results += [sweep_decode(b, args.decode_context, *shape, rates.copy_bytes_per_s, max(10, args.reps // 5))
                    for b in args.decode_batch]
        results += [sweep_prefill(t, *shape, rates.matmul_flops_per_s, max(10, args.reps // 5), variant)
                    for t in args.prefill_tokens for variant in ("paged", "new_kv")]
    if args.gemv and device.type == "cuda":  # the interpreter says nothing of bandwidth
        results += [bench_gemv(b, name, n, k, dtype, device, rates.copy_bytes_per_s, args.reps)
                    for b in args.gemv_batch for name, n, k in GEMV_SHAPES]
        if args.sweep:
            results += [sweep_gemv(b, name, n, k, dtype, device, rates.copy_bytes_per_s, max(10, args.reps // 5))
                        for b in args.gemv_batch for name, n, k in GEMV_SHAPES]
    if args.w4a16 and device.type == "cuda":  # the interpreter says nothing of bandwidth
        results += [bench_w4a16(b, name, n, k, W4A16_GROUP, dtype, device, rates.copy_bytes_per_s, args.reps)
                    for b in args.w4a16_batch for name, n, k in W4A16_SHAPES]
        if args.sweep:
            results += [sweep_w4a16(b, name, n, k, W4A16_GROUP, dtype, device, rates.copy_bytes_per_s,
                                    max(10, args.reps // 5))
                        for b in args.w4a16_batch for name, n, k in W4A16_SHAPES]
    if args.moe and device.type == "cuda":  # the interpreter says nothing of bandwidth
        results += [bench_moe(args.moe_model, b, dtype, device, rates.copy_bytes_per_s, args.reps)
                    for b in args.moe_batch]
        if args.sweep:
            results += [sweep_moe(args.moe_model, b, dtype, device, rates.copy_bytes_per_s, max(10, args.reps // 5))
                        for b in args.moe_batch]
    summary = {"device": rates.device, "dtype": str(dtype).removeprefix("torch."), "rates": rates.to_dict(),
               "num_heads": args.num_heads, "num_kv_heads": args.num_kv_heads, "head_dim": args.head_dim,
               "block_size": args.block_size, "sampling_vocab": args.sampling_vocab, "results": results}
    print(f"kernels on {rates.device} ({summary['dtype']}): copy {rates.copy_bytes_per_s / 1e9:,.0f} GB/s, "
          f"matmul {rates.matmul_flops_per_s / 1e12:,.1f} TFLOP/s")
    for r in results:
        if r["kernel"] == "paged_decode_attention":
            print(f"  decode  B={r['batch']:<4} ctx={r['context']:<6} window={r['window'] or '-':<6} "
                  f"splits={r['num_kv_splits']:<3} "
                  f"{r['time_us']:9.1f} us  {r['gb_per_s']:8,.0f} GB/s = {r['fraction_of_copy_bandwidth']:6.1%} of copy"
                  f"  (rel err {r['rel_err']:.1e})")
        elif r["kernel"] == "gemv":
            print(f"  gemv    M={r['batch']:<3} {r['name']:<8} N={r['n']:<6} K={r['k']:<6} cfg={tuple(r['config'])} "
                  f"{r['time_us']:8.1f} us {r['gb_per_s']:7,.0f} GB/s = {r['fraction_of_copy_bandwidth']:6.1%} of copy; "
                  f"cuBLAS {r['cublas_time_us']:8.1f} us {r['cublas_gb_per_s']:7,.0f} GB/s = "
                  f"{r['cublas_fraction_of_copy_bandwidth']:6.1%} ({r['ours_over_cublas']:.2f}x, "
                  f"rel err {r['rel_err']:.1e})")
        elif r["kernel"] == "w4a16_matmul":
            print(f"  w4a16   M={r['batch']:<4} {r['name']:<8} N={r['n']:<6} K={r['k']:<6} cfg={tuple(r['config'])} "
                  f"{r['time_us']:8.1f} us {r['gb_per_s']:7,.0f} GB/s = {r['fraction_of_copy_bandwidth']:6.1%} of copy; "
                  f"bf16 {r['bf16_time_us']:8.1f} us = {r['bf16_fraction_of_copy_bandwidth']:6.1%} "
                  f"({r['ours_over_bf16']:.2f}x, max rel err {r['max_rel_err']:.1e})")
        elif r["kernel"] == "fused_moe":
            print(f"  moe     B={r['batch']:<4} {r['model']} experts={r['experts_touched']:<3} cfg={tuple(r['config'])} "
                  f"{r['time_us']:8.1f} us {r['gb_per_s']:7,.0f} GB/s = {r['fraction_of_copy_bandwidth']:6.1%} of copy; "
                  f"torch loop {r['torch_loop_time_us']:8.1f} us ({r['ours_over_torch_loop']:.2f}x, "
                  f"rel err {r['rel_err']:.1e})")
        elif r["kernel"] == "fused_moe_sweep":
            for b in r["best"]:
                print(f"  sweep   moe B={r['batch']} config={tuple(b['config'])}: {b['time_us']:8.1f} us "
                      f"{b['gb_per_s']:7,.0f} GB/s = {b['fraction_of_copy_bandwidth']:6.1%} "
                      f"(default {tuple(r['default_config'])})")
        elif r["kernel"] in ("gemv_sweep", "w4a16_sweep"):
            for b in r["best"]:
                print(f"  sweep   {r['kernel'][:-6]} M={r['batch']} {r['name']} config={tuple(b['config'])}: "
                      f"{b['time_us']:8.1f} us {b['gb_per_s']:7,.0f} GB/s = {b['fraction_of_copy_bandwidth']:6.1%} "
                      f"(default {tuple(r['default_config'])})")
        elif r["kernel"].endswith("_sweep"):
            shape_txt = f"B={r['batch']} ctx={r['context']}" if "batch" in r else f"T={r['tokens']}"
            for b in r["best"][:3]:
                frac = b.get("fraction_of_copy_bandwidth", b.get("fraction_of_matmul_rate"))
                print(f"  sweep   {r['kernel'][:-6]} {shape_txt} splits={b.get('splits', '-')} config={b['config']}: "
                      f"{b['time_us']:9.1f} us = {frac:6.1%}")
        elif r["kernel"] == "hash_gumbel_argmax":
            print(f"  sample  B={r['batch']:<4} V={r['vocab']:<7} {r['time_us']:9.1f} us  {r['gb_per_s']:8,.0f} GB/s = "
                  f"{r['fraction_of_copy_bandwidth']:6.1%} of copy; torch {r['torch_time_us']:9.1f} us "
                  f"({r['ours_over_torch']:.1f}x faster, tokens agree {r['token_agreement']:.1%})")
        else:
            new = r["new_kv"]
            for name, v in (("paged", r), ("new K/V", new)):
                print(f"  prefill T={r['tokens']:<6} {name:<7} {v['time_us']:9.1f} us  {v['tflops']:7.1f} TFLOP/s = "
                      f"{v['fraction_of_matmul_rate']:6.1%} of matmul; SDPA {r['sdpa_tflops']:7.1f} TFLOP/s "
                      f"(ours/SDPA speed {v['ours_over_sdpa']:.2f}x, rel err {v['rel_err_vs_sdpa']:.1e})")
            print(f"  prefill T={r['tokens']:<6} new K/V over paged: {new['speedup_over_paged']:.2f}x")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
