"""Choose, per linear weight shape, the Triton small-batch GEMV or cuBLAS, by timing both at start-up.

At decode batch sizes a linear layer is bound by reading its weight; whichever kernel streams it faster on
this card and this shape wins. Timing here, on the model's own weights, makes the choice hold on any GPU
and never slower than cuBLAS: a shape where the GEMV does not win keeps cuBLAS. It runs before the CUDA
graphs are captured, so they capture the chosen kernels.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from services.gpu_worker.model.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear

ROWS_TRIED = (1, 2, 4, 8)  # batch sizes at which the GEMV must win to be used up to that size
MIN_GAIN = 0.03  # it must be this much faster: timing noise must not flip a tie
_MAX_WEIGHTS_TIMED = 8  # distinct weights cycled per shape, so no timed read comes from L2


def linear_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead))]


def _time_per_call(fn, weights: list[torch.Tensor], reps: int) -> float:
    """Median seconds of fn(w) over a pass through `weights` (CUDA events), per weight."""
    for w in weights:
        fn(w)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for w in weights:
            fn(w)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(weights))
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def select_gemv(model: nn.Module, reps: int = 20, log=print) -> dict[tuple[int, int], dict]:
    """Set `gemv_max_rows` on every linear module (0: cuBLAS at every size) and return, per weight shape,
    the rows chosen and the timings in µs at each size tried."""
    try:
        from kernels.gemv import gemv
    except ImportError:  # no Triton: cuBLAS everywhere
        return {}
    by_shape: dict[tuple[int, int], list[nn.Module]] = defaultdict(list)
    for m in linear_modules(model):
        by_shape[tuple(m.weight.shape)].append(m)
    report = {}
    for (n, k), mods in by_shape.items():
        weights = [m.weight for m in mods][:_MAX_WEIGHTS_TIMED]
        chosen, timings = 0, {}
        for rows in ROWS_TRIED:
            x = torch.randn(rows, k, dtype=weights[0].dtype, device=weights[0].device)
            ours = _time_per_call(lambda w: gemv(x, w), weights, reps)
            cublas = _time_per_call(lambda w: F.linear(x, w), weights, reps)
            timings[rows] = {"gemv_us": ours * 1e6, "cublas_us": cublas * 1e6}
            if ours > (1 - MIN_GAIN) * cublas:
                break
            chosen = rows
        for m in mods:
            m.gemv_max_rows = chosen
        report[(n, k)] = {"gemv_max_rows": chosen, "timings": timings}
    summary = ", ".join(f"{n}x{k}: {r['gemv_max_rows']} "
                        f"({r['timings'][1]['gemv_us']:.0f} vs {r['timings'][1]['cublas_us']:.0f} us at 1 row)"
                        for (n, k), r in report.items())
    log(f"small-batch GEMV (rows up to which it replaces cuBLAS, per weight shape): {summary}")
    return report
