"""Device time of a kernel launch sequence, without the host's launch cost.

Serving runs its kernels inside CUDA graphs, where the host's launch cost is gone. Events recorded around
an eager call time something else for short kernels: the GPU sits idle while Python launches the kernel
(tens of µs for a Triton kernel with many arguments), so a 20 µs GEMV times as 70 µs, and a comparison
with cuBLAS (launched from C++) is skewed. Here each timed call is queued behind a spin kernel
(torch.cuda._sleep) that outlasts the host's launches, so the GPU meets start event, kernels and end
event back to back. A rep whose start event had already been reached when the host finished queueing
is timed again with a longer spin: its time would include host work.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch

_MIN_SPIN_S = 50e-6
_MAX_SPIN_S = 0.5  # a launch sequence slower than this to queue is not a kernel benchmark


@functools.lru_cache(maxsize=None)
def _spin_cycles_per_s(device_index: int) -> float:
    """Cycles of torch.cuda._sleep per second on this device (calibrated once: clocks vary by card)."""
    with torch.cuda.device(device_index):
        cycles = 2_000_000
        torch.cuda._sleep(cycles)  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / (start.elapsed_time(end) / 1e3)


def device_seconds(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> list[float]:
    """Seconds the GPU spends from the start of fn()'s first kernel to the end of its last, once per rep."""
    assert device.type == "cuda"
    index = device.index if device.index is not None else torch.cuda.current_device()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    host_s = time.perf_counter() - t0  # queueing cost of one call (device time overlaps it)
    torch.cuda.synchronize(device)
    rate = _spin_cycles_per_s(index)
    spin_s = max(_MIN_SPIN_S, 3 * host_s)
    times: list[float] = []
    while len(times) < reps:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(spin_s * rate))
        start.record()
        fn()
        end.record()
        covered = not start.query()  # the GPU was still spinning when the last launch was queued
        end.synchronize()
        if covered:
            times.append(start.elapsed_time(end) / 1e3)
        elif spin_s < _MAX_SPIN_S:
            spin_s *= 2
        else:
            raise RuntimeError("cannot queue the call ahead of the GPU: host launch cost over 0.5 s")
    return times


def device_time_median(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    return statistics.median(device_seconds(fn, device, reps, warmup))
