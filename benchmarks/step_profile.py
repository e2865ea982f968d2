"""Where a decode step's time goes: torch.profiler over steady-state decode steps of the in-process engine.

For each batch size: submit the batch (greedy, EOS ignored), step until every request is decoding, then
profile --steps steps. Reports the wall time per step, the GPU's kernel time per step (the sum of device
kernel durations: the rest of the wall time the GPU sat idle, waiting on the host), and the kernels that
take the most time. JSON with --output-json.

    python benchmarks/step_profile.py --model random:llama-3-8b --max-model-len 2048 --batch-size 1 256
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from common.sampling_params import SamplingParams
from headrace.config_args import add_engine_args, engine_config_from_args
from headrace.engine import LLMEngine


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_args(p)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 256])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--prefill-prompts", type=int, default=0,
                   help="also profile the prefill of this many prompts of --prefill-len submitted together")
    p.add_argument("--prefill-len", type=int, default=1024)
    p.add_argument("--host-profile", type=int, default=0, metavar="TOKENS",
                   help="also cProfile the host side of single-prompt prefill steps of this many tokens")
    p.add_argument("--output-json", default=None)
    return p


def profile_batch(engine: LLMEngine, batch: int, input_len: int, steps: int, top: int, tag: str) -> dict:
    rng = np.random.default_rng(batch)
    vocab = engine.runner.arch.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=steps + 40, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", rng.integers(0, vocab, input_len).tolist(), params)
    started: set[str] = set()
    while len(started) < batch:  # prefill (and a few decode steps) outside the profile
        started.update(o.req_id for o in engine.step())
    for _ in range(5):
        engine.step()
    _sync()
    with profile(activities=_activities()) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        _sync()
        wall = time.perf_counter() - t0
    engine.abort([f"{tag}-{i}" for i in range(batch)])
    while engine.has_unfinished_requests():
        engine.step()
    total = _summary(prof, wall, steps, top)
    return {
        "batch_size": batch,
        "steps": steps,
        "wall_ms_per_step": total["wall_ms"] / steps,
        "gpu_kernel_ms_per_step": total["gpu_kernel_ms"] / steps,
        "gpu_busy_fraction": total["gpu_busy_fraction"],
        "top_kernels_ms_per_step": [(name, ms / steps) for name, ms in total["top_kernels_ms"]],
    }


def profile_prefill(engine: LLMEngine, num_prompts: int, input_len: int, top: int, tag: str) -> dict:
    """The prefill steps of num_prompts prompts submitted together (chunked by the token budget)."""
    rng = np.random.default_rng(num_prompts)
    vocab = engine.runner.arch.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for i in range(num_prompts):
        engine.add_request(f"{tag}-{i}", rng.integers(0, vocab, input_len).tolist(), params)
    _sync()
    steps = 0
    with profile(activities=_activities()) as prof:
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        _sync()
        wall = time.perf_counter() - t0
    return _summary(prof, wall, steps, top) | {"prompts": num_prompts, "input_len": input_len,
                                                "tokens_per_s": num_prompts * input_len / wall}


def host_profile_prefill(engine: LLMEngine, input_len: int, repeats: int, top: int) -> str:
    """cProfile of the host side of single-prompt prefill steps: what Python does while the GPU waits."""
    import cProfile
    import io
    import pstats

    rng = np.random.default_rng(7)
    vocab = engine.runner.arch.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    prof = cProfile.Profile()
    for i in range(repeats):
        engine.add_request(f"host-{i}", rng.integers(0, vocab, input_len).tolist(), params)
        prof.enable()
        while engine.has_unfinished_requests():
            engine.step()
        prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _activities() -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])


def _summary(prof, wall: float, steps: int, top: int) -> dict:
    """Wall time, summed device-kernel time, and the `top` kernels by total time, over the profiled span."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time_total for e in kernels)
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time_total
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {"steps": steps, "wall_ms": wall * 1e3, "gpu_kernel_ms": gpu_us / 1e3,
            "gpu_busy_fraction": gpu_us / 1e3 / (wall * 1e3) if wall else 0.0,
            "top_kernels_ms": [(name[:90], us / 1e3) for name, us in ranked]}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    engine = LLMEngine(engine_config_from_args(args))
    results = []
    for batch in args.batch_size:
        profile_batch(engine, batch, args.input_len, 5, args.top, f"warm{batch}")  # compiles, warms
        r = profile_batch(engine, batch, args.input_len, args.steps, args.top, f"b{batch}")
        results.append(r)
        print(f"batch {batch}: {r['wall_ms_per_step']:.2f} ms/step wall, {r['gpu_kernel_ms_per_step']:.2f} ms "
              f"GPU kernels ({100 * r['gpu_busy_fraction']:.1f}% busy)")
        for name, ms in r["top_kernels_ms_per_step"]:
            print(f"    {ms:8.3f} ms  {name}")
    if args.prefill_prompts:
        profile_prefill(engine, 2, args.prefill_len, args.top, "warm-prefill")
        r = profile_prefill(engine, args.prefill_prompts, args.prefill_len, args.top, "prefill")
        results.append(r)
        print(f"prefill {args.prefill_prompts} x {args.prefill_len}: {r['steps']} steps, {r['wall_ms']:.1f} ms wall, "
              f"{r['gpu_kernel_ms']:.1f} ms GPU kernels ({100 * r['gpu_busy_fraction']:.1f}% busy), "
              f"{r['tokens_per_s']:,.0f} prompt tok/s")
        for name, ms in r["top_kernels_ms"]:
            print(f"    {ms:8.3f} ms  {name}")
    if args.host_profile:
        host_profile_prefill(engine, args.host_profile, 2, args.top)  # warm
        print(host_profile_prefill(engine, args.host_profile, 10, 3 * args.top))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
