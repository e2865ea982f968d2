"""kernels.timing: device time only, the host's launch cost left out (GPU)."""

from __future__ import annotations

import time

import pytest
import torch

from headrace.kernels.timing import device_seconds

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="device timing needs a GPU")


def test_a_slow_host_is_not_timed():
    """fn spends 2 ms on the host before its one tiny kernel: eager events would time >= 2 ms, the device
    spends microseconds."""
    device = torch.device("cuda")
    x = torch.zeros(1024, device=device)

    def fn():
        time.sleep(0.002)
        x.add_(1)
    times = device_seconds(fn, device, reps=5)
    assert len(times) == 5 and max(times) < 0.5e-3, times


def test_device_work_is_timed():
    """A known amount of device work (a 1 GiB copy, hundreds of µs on any GPU) is timed as such."""
    device = torch.device("cuda")
    src = torch.ones(1 << 28, device=device)
    dst = torch.empty_like(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        dst.copy_(src)
    end.record()
    end.synchronize()
    eager = start.elapsed_time(end) / 1e3 / 5  # long kernels: launch cost negligible here
    got = sorted(device_seconds(lambda: dst.copy_(src), device, reps=5))[2]
    assert got == pytest.approx(eager, rel=0.2)
