"""Where a decode step's time goes: torch.profiler over steady-state decode steps of the in-process engine.

For each batch size: submit the batch (greedy, EOS ignored), step until every request is decoding, then
profile --steps steps. Reports the wall time per step, the GPU's kernel time per step (the sum of device
kernel durations: the rest of the wall time the GPU sat idle, waiting on the host), and the kernels that
take the most time. --prefill-prompts does the same for pure-prefill steps, --mixed-decodes for mixed steps
(that many running decodes beside prefill chunks that fill the rest of the token budget, as in a busy
`bench throughput` run). JSON with --output-json.

    python -m headrace.bench.step_profile --model random:llama-3-8b --max-model-len 2048 --batch-size 1 256 \
        --prefill-prompts 32 --mixed-decodes 248
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from headrace.common.sampling_params import SamplingParams
from headrace.bench.throughput import step_record
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
    p.add_argument("--mixed-decodes", type=int, default=0, metavar="D",
                   help="also profile mixed steps: D running decodes (prompts of --input-len, as the decode rows) "
                        "beside chunks of --prefill-len prompts that fill the rest of the token budget")
    p.add_argument("--mixed-steps", type=int, default=8, help="mixed steps to profile")
    p.add_argument("--host-profile", type=int, default=0, metavar="TOKENS",
                   help="also cProfile the host side of single-prompt prefill steps of this many tokens")
    p.add_argument("--output-json", default=None)
    return p


def start_decodes(engine: LLMEngine, batch: int, input_len: int, max_tokens: int, tag: str) -> list[str]:
    """Submit `batch` prompts of input_len (greedy, EOS ignored) and step until every one is decoding, plus 5
    decode steps; returns their ids."""
    rng = np.random.default_rng(batch)
    vocab = engine.runner.arch.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(batch)]
    for req_id in ids:
        engine.add_request(req_id, rng.integers(0, vocab, input_len).tolist(), params)
    started: set[str] = set()
    while len(started) < batch:  # prefill (and a few decode steps) outside the profile
        started.update(o.req_id for o in engine.step())
    for _ in range(5):
        engine.step()
    return ids


def end_requests(engine: LLMEngine, req_ids: list[str]) -> None:
    """Abort the profiled requests and step until the engine is idle."""
    engine.abort(req_ids)
    while engine.has_unfinished_requests():
        engine.step()


def profile_batch(engine: LLMEngine, batch: int, input_len: int, steps: int, top: int, tag: str) -> dict:
    ids = start_decodes(engine, batch, input_len, steps + 40, tag)
    _sync()
    with profile(activities=_activities()) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        _sync()
        wall = time.perf_counter() - t0
    end_requests(engine, ids)
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
    total = _summary(prof, wall, steps, top)
    return total | {"prompts": num_prompts, "input_len": input_len, "tokens_per_s": num_prompts * input_len / wall,
                    "wall_ms_per_step": total["wall_ms"] / steps,
                    "gpu_kernel_ms_per_step": total["gpu_kernel_ms"] / steps}


def profile_mixed(engine: LLMEngine, decodes: int, input_len: int, prefill_len: int, steps: int, top: int,
                  tag: str) -> dict:
    """Steps that hold `decodes` running decodes (set up as the decode rows) and prefill chunks of prefill_len
    prompts (max_tokens 1: they finish at the end of their prefill, so the decode count stays put) filling the
    rest of the token budget. The real scheduler packs the steps; for the span of the profile it gets enough
    sequence slots that the budget, not max_num_seqs, bounds the prefill (finished prompts hold their slot
    until their step's result is applied). Reports the profiled steps' actual mean composition."""
    sched = engine.scheduler
    room = sched.max_num_batched_tokens - decodes  # prefill tokens per step
    if room < 2:
        raise SystemExit(f"--mixed-decodes {decodes} leaves no prefill room in a "
                         f"{sched.max_num_batched_tokens}-token step")
    seats = sched.max_num_seqs
    sched.max_num_seqs = max(seats, decodes + 2 * (-(-room // prefill_len) + 1))
    try:
        ids = start_decodes(engine, decodes, input_len, steps + 60, tag)
        rng = np.random.default_rng(decodes + 1)
        vocab = engine.runner.arch.vocab_size
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        num_prompts = -(-(steps + 4) * room // prefill_len) + 2  # enough prefill to last past the profile
        for i in range(num_prompts):
            ids.append(f"{tag}-prefill-{i}")
            engine.add_request(ids[-1], rng.integers(0, vocab, prefill_len).tolist(), params)
        for _ in range(10):  # the step in flight at submission holds no prefill: wait for one that does
            engine.step()
            if step_record(engine, 0.0)[2]:
                break
        engine.step()
        _sync()
        mix = []
        with profile(activities=_activities()) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.step()
                mix.append(step_record(engine, 0.0)[:3])  # (decodes, prefill requests, prefill tokens)
            _sync()
            wall = time.perf_counter() - t0
        end_requests(engine, ids)
    finally:
        sched.max_num_seqs = seats
    total = _summary(prof, wall, steps, top)
    dec, pre_reqs, pre_tokens = (sum(col) / steps for col in zip(*mix))
    return total | {
        "mixed_decodes": decodes, "decode_input_len": input_len, "prefill_len": prefill_len,
        "wall_ms_per_step": total["wall_ms"] / steps, "gpu_kernel_ms_per_step": total["gpu_kernel_ms"] / steps,
        "top_kernels_ms_per_step": [(name, ms / steps) for name, ms in total["top_kernels_ms"]],
        "mean_decode_requests": dec, "mean_prefill_requests": pre_reqs, "mean_prefill_tokens": pre_tokens,
        "min_prefill_tokens": min(m[2] for m in mix), "tokens_per_s": (dec + pre_tokens) * steps / wall,
    }


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
              f"{r['tokens_per_s']:,.0f} prompt tok/s; per step {r['wall_ms_per_step']:.2f} ms wall, "
              f"{r['gpu_kernel_ms_per_step']:.2f} ms GPU kernels")
        for name, ms in r["top_kernels_ms"]:
            print(f"    {ms:8.3f} ms  {name}")
    if args.mixed_decodes:
        profile_mixed(engine, args.mixed_decodes, args.input_len, args.prefill_len, 2, args.top, "warm-mixed")
        r = profile_mixed(engine, args.mixed_decodes, args.input_len, args.prefill_len, args.mixed_steps, args.top,
                          "mixed")
        results.append(r)
        print(f"mixed {args.mixed_decodes} decodes + {args.prefill_len}-token prompts: {r['steps']} steps, "
              f"{r['wall_ms_per_step']:.2f} ms/step wall, {r['gpu_kernel_ms_per_step']:.2f} ms GPU kernels "
              f"({100 * r['gpu_busy_fraction']:.1f}% busy); per step {r['mean_decode_requests']:.1f} decodes + "
              f"{r['mean_prefill_tokens']:.1f} prefill tokens ({r['mean_prefill_requests']:.1f} prefill requests), "
              f"{r['tokens_per_s']:,.0f} tok/s")
        for name, ms in r["top_kernels_ms_per_step"]:
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
