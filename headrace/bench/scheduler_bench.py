"""Scheduler cost per step at N running requests (CPU): schedule() + update_from_output(), no model.

    python -m headrace.bench.scheduler_bench --running 256 --steps 1000 [--prefix-caching] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from headrace.common.config import CacheConfig, SchedulerConfig
from headrace.common.messages import StepResult
from headrace.common.sampling_params import SamplingParams
from headrace.services.scheduler.request import Request
from headrace.services.scheduler.scheduler import Scheduler


def run(running: int, steps: int, prefix_caching: bool, prompt_len: int) -> dict:
    sched = Scheduler(SchedulerConfig(max_num_seqs=running, max_num_batched_tokens=max(8192, running * prompt_len)),
                      CacheConfig(enable_prefix_caching=prefix_caching), num_blocks=running * 128,
                      max_model_len=4096)
    params = SamplingParams(max_tokens=steps + 10, ignore_eos=True)
    for i in range(running):
        sched.add_request(Request(f"r{i}", list(range(i, i + prompt_len)), params, i, (2,)))
    per_step = []
    wall0 = time.perf_counter()
    for _ in range(steps):
        c0 = time.process_time()
        plan = sched.schedule()
        ids = list(plan.num_scheduled_tokens)
        sched.update_from_output(plan, StepResult(plan.step_id, ids, [5] * len(ids)))
        per_step.append(time.process_time() - c0)
    wall = time.perf_counter() - wall0
    assert sched.num_running == running
    decode = per_step[1:]
    return {"running": running, "steps": steps, "prefix_caching": prefix_caching,
            "steps_per_s": steps / wall, "cpu_ms_per_step_median": statistics.median(decode) * 1e3,
            "cpu_ms_per_step_mean": statistics.fmean(decode) * 1e3,
            "cpu_ms_per_step_p99": sorted(decode)[int(0.99 * len(decode))] * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--running", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--prefix-caching", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = run(args.running, args.steps, args.prefix_caching, args.prompt_len)
    for k, v in res.items():
        print(f"{k:>26}: {v:.3f}" if isinstance(v, float) else f"{k:>26}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
