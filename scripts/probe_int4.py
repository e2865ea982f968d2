"""Probe: torch's tinygemm int4 (aten._weight_int4pack_mm) and cuBLAS fp8 vs ours at small M, Llama-3-8B shapes."""
import json, os, sys
import torch
import torch.nn.functional as F
from headrace.bench import roofline
from headrace.bench.kernels import w4a16_inputs, w4a16_bytes, _cycling
from headrace.kernels.w4a16_matmul import w4a16_matmul, unpack
from headrace.kernels.fp8_gemv import fp8_gemv

dev = torch.device("cuda")
copy = roofline.measure_copy_bandwidth(dev)
print(f"copy {copy/1e9:.0f} GB/s  torch {torch.__version__}")
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
G = 128
res = []
for name, n, k in SHAPES:
    x1, ws = w4a16_inputs(1, n, k, G, torch.bfloat16, dev)
    tiny = []
    for qw, s, z in ws:
        q = unpack(qw).T.contiguous()  # [N, K] 0..15
        packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        sz = torch.stack([s, (8 - z.float()) * s.float()], dim=-1).to(torch.bfloat16).contiguous()  # [K/G, N, 2]
        tiny.append((packed, sz))
    nbytes = w4a16_bytes(n, k, G, torch.bfloat16)
    for ikt in (2, 4, 8):
        try:
            tw = [(torch.ops.aten._convert_weight_to_int4pack(p, ikt), sz) for p, sz in tiny]
        except Exception as e:
            print("convert fail", ikt, e); continue
        for m in (1, 2, 4, 8, 16, 32, 64):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            try:
                y = torch.ops.aten._weight_int4pack_mm(x, tw[0][0], G, tw[0][1])
                ref = w4a16_matmul(x, *ws[0], G)
                err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                t = roofline.time_median(_cycling(lambda w: torch.ops.aten._weight_int4pack_mm(x, w[0], G, w[1]), tw), dev, 30)
                t_ours = roofline.time_median(_cycling(lambda w: w4a16_matmul(x, *w, G), ws), dev, 30)
            except Exception as e:
                print("mm fail", name, ikt, m, str(e)[:200]); continue
            r = dict(name=name, ikt=ikt, m=m, tiny_us=t*1e6, tiny_bw=nbytes/t/copy, ours_us=t_ours*1e6, ours_bw=nbytes/t_ours/copy, err=err)
            res.append(r)
            print(f"{name:8} ikt={ikt} M={m:<3} tinygemm {t*1e6:7.1f}us {nbytes/t/copy:5.1%}  ours {t_ours*1e6:7.1f}us {nbytes/t_ours/copy:5.1%}  err {err:.1e}")
    del tw, tiny, ws
    # fp8
    w8 = [(torch.randn(n, k, device=dev) / k**0.5).to(torch.float8_e4m3fn) for _ in range(max(1, (256 << 20) // (n * k)))]
    sc = torch.ones(n, device=dev)
    nb8 = n * k
    t = roofline.time_median(_cycling(lambda w: fp8_gemv(x1, w, sc), w8), dev, 30)
    print(f"{name:8} fp8 ours M=1 {t*1e6:7.1f}us {nb8/t/copy:5.1%}")
    for m in (1, 16, 64):
        xq = torch.randn(m, k, device=dev).to(torch.float8_e4m3fn)
        one = torch.ones((), device=dev)
        try:
            t = roofline.time_median(_cycling(lambda w: torch._scaled_mm(xq, w.T, one, one, out_dtype=torch.bfloat16), w8), dev, 30)
            print(f"{name:8} fp8 _scaled_mm M={m} {t*1e6:7.1f}us {nb8/t/copy:5.1%}")
        except Exception as e:
            print("scaled_mm fail", e)
    wb = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(max(1, (256 << 20) // (2 * n * k)))]
    for m in (1, 16, 64):
        xb = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        t = roofline.time_median(_cycling(lambda w: F.linear(xb, w), wb), dev, 30)
        print(f"{name:8} bf16 cuBLAS M={m} {t*1e6:7.1f}us {2*n*k/t/copy:5.1%}")
    del w8, wb
os.makedirs(os.environ.get("OUT", "/tmp/out"), exist_ok=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp/out"), "probe.json"), "w"), indent=1)
