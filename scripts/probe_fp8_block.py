"""Probe: launch configurations of kernels/fp8_block_matmul.py at decode and prefill row counts, against the old
path (the weight dequantized to bf16 on every call, then cuBLAS). Prints the fastest configs; writes JSON."""
import itertools
import json
import os

import torch
import torch.nn.functional as F
from headrace.bench import roofline
from headrace.bench.kernels import _cycling
from headrace.kernels.fp8_block_matmul import default_config, fp8_block_matmul, per_token_group_quant

dev = torch.device("cuda")
rows = []
for name, n, k in [("qkv", 6144, 4096), ("down", 4096, 14336), ("gate_up", 28672, 4096)]:
    w8 = [(torch.randn(n, k, device=dev) / k**0.5).to(torch.float8_e4m3fn) for _ in range(max(1, (256 << 20) // (n * k)))]
    ws = torch.rand(n, k // 128, device=dev) + 0.5
    for m in (1, 16, 64, 512, 4096):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        xq, xs = per_token_group_quant(x)
        deq = roofline.time_median(_cycling(lambda w: F.linear(x, (w.to(torch.bfloat16).view(n, k // 128, 128) * ws[..., None]).view(n, k).to(torch.bfloat16)), w8), dev, 10)
        results = []
        for bm, bn, warps, stages in itertools.product((16, 32, 64, 128), (32, 64, 128, 256), (4, 8), (3, 4)):
            if (m <= 16 and bm > 32) or (m >= 512 and bm < 64) or (bm == 128 and bn == 256 and stages == 4):
                continue
            try:
                t = roofline.time_median(_cycling(lambda w: fp8_block_matmul(xq, xs, w, ws, torch.bfloat16, None, (bm, bn, warps, stages)), w8), dev, 10)
            except Exception as e:  # out of shared memory etc.
                continue
            results.append((t, (bm, bn, warps, stages)))
        results.sort()
        t_def = roofline.time_median(_cycling(lambda w: fp8_block_matmul(xq, xs, w, ws, torch.bfloat16), w8), dev, 10)
        best = results[0]
        print(f"{name:8} M={m:<5} default {default_config(m)} {t_def*1e6:8.1f}us | best {best[1]} {best[0]*1e6:8.1f}us "
              f"({2*m*n*k/best[0]/1e12:6.1f} TF, {n*k/best[0]/1e9:6.0f} GB/s) | next {[(c, round(t*1e6,1)) for t, c in results[1:4]]} "
              f"| dequant+cuBLAS {deq*1e6:8.1f}us", flush=True)
        rows.append(dict(name=name, m=m, default_us=t_def * 1e6, best=best[1], best_us=best[0] * 1e6, dequant_us=deq * 1e6))
    del w8
out = os.environ.get("OUT", "/tmp/out")
os.makedirs(out, exist_ok=True)
json.dump(rows, open(os.path.join(out, "probe_fp8_block.json"), "w"), indent=1)
