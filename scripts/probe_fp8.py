"""Probe: FP8 linear at M rows, Llama-3-8B shapes: rowwise torch._scaled_mm after our one-kernel per-token quant
(or torch's four-kernel one), our fp8_gemv at M=1, bf16 cuBLAS."""
import json
import os

import torch
import torch.nn.functional as F
from headrace.bench import roofline
from headrace.bench.kernels import _cycling
from headrace.kernels.fp8_gemv import fp8_gemv
from headrace.kernels.fp8_block_matmul import fp8_block_matmul, per_token_group_quant
from headrace.kernels.fp8_quant import per_token_quant, per_token_quant_reference

dev = torch.device("cuda")
copy = roofline.measure_copy_bandwidth(dev)[0]
mm_rate = roofline.measure_matmul_rate(dev, torch.bfloat16)
print(f"copy {copy/1e9:.0f} GB/s bf16 mm {mm_rate}")
rows = []
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
for name, n, k in SHAPES:
    copies = max(1, (512 << 20) // (n * k))
    w8 = [(torch.randn(n, k, device=dev) / k**0.5).to(torch.float8_e4m3fn) for _ in range(copies)]
    sw = torch.rand(1, n, device=dev) + 0.5
    wsb = torch.rand(n, k // 128, device=dev) + 0.5  # 128x128 block scales, held per row
    wb = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(max(1, copies // 2))]
    for m in (1, 2, 4, 16, 64, 256, 1024, 4096):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        xq, sx = per_token_quant(x)
        tq = roofline.time_median(lambda: per_token_quant(x), dev, 50)
        tq_t = roofline.time_median(lambda: per_token_quant_reference(x), dev, 50)
        tmm = roofline.time_median(_cycling(lambda w: torch._scaled_mm(xq, w.T, scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16), w8), dev, 30)
        tb = roofline.time_median(_cycling(lambda w: F.linear(x, w), wb), dev, 30)
        line = (f"{name:8} M={m:<5} quant ours {tq*1e6:6.1f}us torch {tq_t*1e6:6.1f}us | rowwise mm {tmm*1e6:7.1f}us "
                f"({n*k/tmm/copy:5.1%} bw, {2*m*n*k/tmm/1e12:6.1f} TF) | bf16 {tb*1e6:7.1f}us ({2*m*n*k/tb/1e12:6.1f} TF) "
                f"| fp8 (ours quant+mm) / bf16 = {tb/(tq+tmm):.2f}x")
        if m == 1:
            tg = roofline.time_median(_cycling(lambda w: fp8_gemv(x, w, sw[0]), w8), dev, 30)
            line += f" | gemv {tg*1e6:6.1f}us"
        xg, sg = per_token_group_quant(x)
        tgq = roofline.time_median(lambda: per_token_group_quant(x), dev, 50)
        tbm = roofline.time_median(_cycling(lambda w: fp8_block_matmul(xg, sg, w, wsb, torch.bfloat16), w8), dev, 30)
        line += f" | block: quant {tgq*1e6:5.1f}us mm {tbm*1e6:7.1f}us ({2*m*n*k/tbm/1e12:6.1f} TF, {tb/(tgq+tbm):.2f}x bf16)"
        rows.append(dict(block_quant_us=tgq * 1e6, block_mm_us=tbm * 1e6, name=name, m=m, quant_us=tq * 1e6, torch_quant_us=tq_t * 1e6, rowwise_mm_us=tmm * 1e6,
                         bf16_us=tb * 1e6, fp8_over_bf16=tb / (tq + tmm), copy_bytes_per_s=copy))
        print(line, flush=True)
    del w8, wb
out = os.environ.get("OUT", "/tmp/out")
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "probe_fp8.json"), "w") as f:
    json.dump(rows, f, indent=1)
