"""CPU quantized products at the embedded model's shapes (SmolLM2-135M: hidden 576, intermediate 1536, vocab
49152): microseconds per product of each candidate operator, per shape, rows M and thread count.

    PYTHONPATH=. python scripts/probe_cpu_qmm.py --rows 1 16 --threads 1 2

Candidates (weights random, the layout each operator takes; what they would cost to keep GGUF exact is a
separate question, docs/cpu.md):
- int4_g32:   aten._weight_int4pack_mm_for_cpu, bf16 activations, groups of 32 (the GGUF path today)
- int4_g32x2: the same twice (how a Q8_0 weight is held: two 4-bit halves)
- int8_wo:    aten._weight_int8pack_mm, bf16 activations x int8 weights, one scale per output channel
- int8_dyn:   x quantized per row to int8, then torch._int_mm (oneDNN, VNNI) and both scales applied
- bf16 / fp32: F.linear on a dense weight (the dequantized reference)
Time is the median of --reps calls after a warm-up, one operator at a time, the load average printed first.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from headrace.bench.roofline import time_median

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def timed_us(fn, reps: int) -> float:
    """Median host microseconds of fn() after three untimed calls."""
    return time_median(fn, torch.device("cpu"), reps, warmup=3) * 1e6


def candidates(n: int, k: int, m: int) -> dict:
    torch.manual_seed(0)
    x32 = torch.randn(m, k)
    x = x32.bfloat16()
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    sz = torch.rand(k // 32, n, 2).bfloat16()
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s8 = torch.rand(n).bfloat16()
    w8t = w8.t().contiguous().t()  # [K, N] view laid out as _int_mm wants its second operand
    s8f = s8.float()
    wb, wf = torch.randn(n, k).bfloat16(), torch.randn(n, k)

    def int4():
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)

    def int4x2():
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
        return y + torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)

    def int8_dyn():
        amax = x32.abs().amax(-1, keepdim=True).clamp_min(1e-8)
        xs = amax / 127
        xq = torch.round(x32 / xs).to(torch.int8)
        return torch._int_mm(xq, w8t.t()).float() * xs * s8f

    return {
        "int4_g32": int4,
        "int4_g32x2": int4x2,
        "int8_wo": lambda: torch.ops.aten._weight_int8pack_mm(x, w8, s8),
        "int8_dyn": int8_dyn,
        "bf16": lambda: F.linear(x, wb),
        "fp32": lambda: F.linear(x32, wf),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, load {os.getloadavg()}")
    names = None
    for threads in args.threads:
        torch.set_num_threads(threads)
        for m in args.rows:
            for shape in args.shapes:
                n, k = SHAPES[shape]
                cands = candidates(n, k, m)
                if names is None:
                    names = list(cands)
                    print(f"{'thr':>3} {'M':>3} {'shape':>8} " + " ".join(f"{c:>10}" for c in names) + "   (us)")
                us = {c: timed_us(fn, args.reps if n < 10000 else max(5, args.reps // 10)) for c, fn in cands.items()}
                print(f"{threads:>3} {m:>3} {shape:>8} " + " ".join(f"{us[c]:>10.1f}" for c in names), flush=True)


if __name__ == "__main__":
    main()
