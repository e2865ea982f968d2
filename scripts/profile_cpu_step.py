"""Where a CPU decode step's time goes: torch.profiler (operators by self time) and cProfile (host Python) over
steady-state decode steps of the in-process engine, per batch size.

    PYTHONPATH=. python scripts/profile_cpu_step.py --dtype bfloat16 --cpu-threads 1 --max-model-len 512 \
        --batch-size 1 16 --steps 20
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

from torch.profiler import ProfilerActivity, profile

from headrace.bench.step_profile import end_requests, start_decodes
from headrace.config_args import add_engine_args, engine_config_from_args
from headrace.engine import LLMEngine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_args(p)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 16])
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--sort", default="tottime", help="cProfile order: tottime or cumulative")
    args = p.parse_args()
    engine = LLMEngine(engine_config_from_args(args))
    for batch in args.batch_size:
        ids = start_decodes(engine, batch, args.input_len, 3 * args.steps + 40, f"p{batch}")
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        plain = (time.perf_counter() - t0) / args.steps * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                engine.step()
        host = cProfile.Profile()
        host.enable()
        for _ in range(args.steps):
            engine.step()
        host.disable()
        end_requests(engine, ids)
        print(f"=== batch {batch}: {plain:.2f} ms/step unprofiled")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        out = io.StringIO()
        pstats.Stats(host, stream=out).sort_stats(args.sort).print_stats(args.top)
        print(out.getvalue())


if __name__ == "__main__":
    main()
