"""`headrace bench throughput`: offline throughput, engine-direct: N requests submitted at once, EOS ignored,
the engine stepped until all finish. Reports requests/s and input/output/total tokens/s, and how close
they come to two rooflines measured in the same run:
- compute: every token (prompt or output) costs 2 x params matmul FLOPs at the measured matmul rate;
- decode: output tokens/s of memory-bound decode steps of min(N, --max-num-seqs) sequences at the
  requests' mean decode context, at the measured copy bandwidth.
`--baseline hf` then runs transformers' `generate` on the same weights, one left-padded batch of the
first B requests for each --hf-batch-sizes B, and reports its best (rows padded to the batch's longest
prompt and output; only the tokens the requests asked for count).
`ours["step_mix"]` breaks the engine's steps down by composition (decode_only, mixed = decodes beside
prefill chunks, prefill_only, empty): steps, seconds, mean ms per step, mean decodes and prefill tokens.

    headrace bench throughput --model random:llama-3-8b --dataset-name random --input-len 1024 \
        --output-len 128 --num-prompts 1000 --baseline hf --hf-batch-sizes 64 256 --output-json tp.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from headrace.common.sampling_params import SamplingParams
from headrace.bench import hf_baseline, roofline
from headrace.bench.datasets import BenchRequest, add_dataset_args, resolve_length_aliases, sample_requests
from headrace.config_args import add_engine_args, engine_config_from_args
from headrace.engine import LLMEngine


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headrace bench throughput", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    add_dataset_args(p)
    b = p.add_argument_group("benchmark")
    b.add_argument("--num-warmup-prompts", type=int, default=16,
                   help="untimed requests first (up to 8 output tokens each): Triton compiles, allocator warms")
    b.add_argument("--output-json", default=None)
    b.add_argument("--disable-tqdm", action="store_true")
    b.add_argument("--baseline", choices=["hf"], default=None,
                   help="also time transformers' generate on the same weights and prompts")
    b.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[64, 128, 256])
    return p


class _ModelVocab:
    """The tokenizer, with its vocabulary cut to the model's: random-weight test presets have fewer ids
    than the tokenizer they borrow, and prompt ids must be valid embeddings."""

    def __init__(self, tokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        self.vocab_size = min(tokenizer.vocab_size, vocab_size)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


def load_requests(args: argparse.Namespace, tokenizer, num_prompts: int, seed: int) -> list[BenchRequest]:
    return sample_requests(args.dataset_name, num_prompts, tokenizer,
                           input_len=args.random_input_len, output_len=args.random_output_len, seed=seed,
                           dataset_path=args.dataset_path, range_ratio=args.random_range_ratio, as_token_ids=True)


STEP_KINDS = ("decode_only", "mixed", "prefill_only", "empty")


def step_record(engine: LLMEngine, seconds: float) -> tuple[int, int, int, float]:
    """(decode requests, prefill requests, prefill tokens, seconds) of the step whose result the engine last
    applied. A decode is a request scheduled one token; every other scheduled request is a prefill chunk
    (a rare 1-token chunk, the tail of a token budget, counts as a decode). One pass over the plan's
    per-request counts, in C: no per-token work, no device sync."""
    plan = engine.last_plan
    if plan is None:
        return 0, 0, 0, seconds
    counts = list(plan.num_scheduled_tokens.values())
    decodes = counts.count(1)
    return decodes, len(counts) - decodes, sum(counts) - decodes, seconds


def step_kind(decodes: int, prefill_tokens: int) -> str:
    if prefill_tokens:
        return "mixed" if decodes else "prefill_only"
    return "decode_only" if decodes else "empty"


def summarize_step_mix(records: list[tuple[int, int, int, float]]) -> dict[str, dict]:
    """Per step kind (decode_only: decodes alone; mixed: decodes beside prefill chunks; prefill_only;
    empty: nothing scheduled), its steps, seconds (the wall time between its completion and the previous
    step's), mean ms per step and mean decode requests / prefill requests / prefill tokens per step."""
    groups: dict[str, list[tuple[int, int, int, float]]] = {kind: [] for kind in STEP_KINDS}
    for rec in records:
        groups[step_kind(rec[0], rec[2])].append(rec)
    mix = {}
    for kind, recs in groups.items():
        n = len(recs)
        seconds = float(sum(r[3] for r in recs))
        mix[kind] = {"steps": n, "seconds": seconds, "mean_ms_per_step": seconds / n * 1e3 if n else 0.0,
                     "mean_decode_requests": sum(r[0] for r in recs) / n if n else 0.0,
                     "mean_prefill_requests": sum(r[1] for r in recs) / n if n else 0.0,
                     "mean_prefill_tokens": sum(r[2] for r in recs) / n if n else 0.0}
    return mix


def format_step_mix(mix: dict[str, dict]) -> list[str]:
    """One line per kind (`empty` only when it occurred)."""
    return [f"step mix {kind:>12}: {m['steps']:5d} steps, {m['seconds']:8.3f} s, {m['mean_ms_per_step']:8.2f} ms/step, "
            f"{m['mean_decode_requests']:6.1f} decodes + {m['mean_prefill_tokens']:7.1f} prefill tokens "
            f"({m['mean_prefill_requests']:.1f} prefill requests) per step"
            for kind, m in mix.items() if kind != "empty" or m["steps"]]


def run_requests(engine: LLMEngine, requests: list[BenchRequest], tag: str, max_tokens_cap: int | None = None,
                 progress: bool = False) -> tuple[float, int, int, dict[str, dict]]:
    """Submit every request at once and step until all finish; returns (seconds, output tokens, steps, step
    mix): the steps broken down by composition (summarize_step_mix). A step's time runs from the previous
    step's completion (the first's from the end of submission) to its own: with async scheduling it
    includes planning and launching the next step, which overlaps this one's GPU work."""
    from tqdm import tqdm

    bar = tqdm(total=len(requests), desc=tag, disable=not progress, unit="req")
    t0 = time.perf_counter()
    for i, req in enumerate(requests):
        out_len = min(req.output_len, max_tokens_cap or req.output_len)
        engine.add_request(f"{tag}-{i}", list(req.prompt),
                           SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True))
    made = steps = 0
    records: list[tuple[int, int, int, float]] = []
    prev = time.perf_counter()
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        records.append(step_record(engine, now - prev))
        prev = now
        steps += 1
        made += sum(len(o.new_token_ids) for o in outs)
        bar.update(sum(o.finished for o in outs))
    seconds = time.perf_counter() - t0
    bar.close()
    return seconds, made, steps, summarize_step_mix(records)


def run_hf(config, requests: list[BenchRequest], batch_sizes: list[int]) -> dict:
    """One left-padded `generate` per batch size over the first B requests; OOM is recorded, not fatal."""
    hf = hf_baseline.load_hf_twin(config)
    hf_baseline.timed_generate(hf, [list(requests[0].prompt)], 2)  # warm-up: kernels, handles
    runs = []
    for batch in sorted({min(b, len(requests)) for b in batch_sizes}):
        chunk = requests[:batch]
        seconds = None
        try:
            seconds = hf_baseline.timed_generate(hf, [list(r.prompt) for r in chunk], max(r.output_len for r in chunk))
        except Exception as exc:  # noqa: BLE001 - an OOM at one batch size still leaves the others' numbers
            if not hf_baseline.is_oom(exc):
                raise
        if seconds is None:  # outside the except block: its traceback no longer pins the failed batch's memory
            runs.append({"batch_size": batch, "error": "out of memory"})
            print(f"HF batch {batch}: out of memory", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        inp, out = sum(r.prompt_len for r in chunk), sum(r.output_len for r in chunk)
        runs.append({"batch_size": batch, "elapsed_s": seconds, "requests_per_s": batch / seconds,
                     "input_tokens_per_s": inp / seconds, "output_tokens_per_s": out / seconds,
                     "total_tokens_per_s": (inp + out) / seconds})
        print(f"HF batch {batch}: {(inp + out) / seconds:,.1f} total tok/s, {out / seconds:,.1f} output tok/s",
              flush=True)
    del hf
    ok = [r for r in runs if "error" not in r]
    return {"runs": runs, "best": max(ok, key=lambda r: r["total_tokens_per_s"]) if ok else None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    resolve_length_aliases(args)
    if args.num_prompts < 1:
        raise SystemExit("--num-prompts must be >= 1")
    config = engine_config_from_args(args)
    rates = roofline.measure_for_engine(config)  # before the engine claims the GPU's memory

    engine = LLMEngine(config)
    runner = engine.runner
    # The weights' bytes are counted as stored (step_weight_bytes below), so nbytes is the KV cache's element size.
    arch, nbytes = runner.arch, roofline.dtype_bytes(runner.kv_layout.dtype)
    from transformers import AutoTokenizer

    tokenizer_dir = engine.config.require_resolved().tokenizer_dir
    tokenizer = _ModelVocab(AutoTokenizer.from_pretrained(tokenizer_dir), arch.vocab_size)
    requests = load_requests(args, tokenizer, args.num_prompts, args.seed)
    if args.num_warmup_prompts > 0:  # other prompts than the timed ones, so prefix caching gains nothing
        warmup = load_requests(args, tokenizer, args.num_warmup_prompts, args.seed + 1)
        run_requests(engine, warmup, "warmup", max_tokens_cap=8)
    preempt0 = engine.scheduler.num_preemptions
    replays0 = runner.decode_graphs.num_replays if runner.decode_graphs is not None else 0
    elapsed, output_tokens, steps, step_mix = run_requests(engine, requests, "requests",
                                                           progress=not args.disable_tqdm)
    input_tokens = sum(r.prompt_len for r in requests)
    total = input_tokens + output_tokens

    batch = min(len(requests), config.scheduler.max_num_seqs)
    mean_context = statistics.fmean(r.prompt_len + r.output_len / 2 for r in requests)
    compute_bound = roofline.compute_roofline_tokens_per_s(rates, arch)
    weight_bytes = roofline.step_weight_bytes(runner.model, batch)
    decode_bound = roofline.decode_roofline_tokens_per_s(rates, arch, nbytes, batch, mean_context, weight_bytes)
    ours = {
        "elapsed_s": elapsed, "requests_per_s": len(requests) / elapsed,
        "input_tokens_per_s": input_tokens / elapsed, "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": total / elapsed,
        "compute_roofline_tokens_per_s": compute_bound, "fraction_of_compute_roofline": total / elapsed / compute_bound,
        "decode_roofline_output_tokens_per_s": decode_bound,
        "fraction_of_decode_roofline": output_tokens / elapsed / decode_bound,
        "decode_roofline_batch": batch, "mean_decode_context": mean_context,
        "engine_steps": steps,
        "graph_replays": (runner.decode_graphs.num_replays - replays0) if runner.decode_graphs is not None else 0,
        "preemptions": engine.scheduler.num_preemptions - preempt0,
        "step_mix": step_mix,
    }
    summary = {
        "benchmark": "throughput", "model": config.model.model or "embedded",
        "dtype": str(runner.dtype).removeprefix("torch."),
        "device": rates.device, "attention_backend": runner.backend.name, "cuda_graphs": runner.decode_graphs is not None,
        "rates": rates.to_dict(), "step_weight_params": roofline.step_weight_params(arch),
        "step_weight_bytes": weight_bytes, "quantization": config.model.quantization,
        "kv_cache_dtype": config.cache.kv_cache_dtype, "kv_cache_blocks": runner.num_blocks,
        "dataset": args.dataset_name, "num_requests": len(requests), "input_tokens": input_tokens,
        "output_tokens": output_tokens, "requested_output_tokens": sum(r.output_len for r in requests),
        "max_num_seqs": config.scheduler.max_num_seqs,
        "max_num_batched_tokens": config.scheduler.max_num_batched_tokens, "ours": ours,
    }
    print(f"ours: {ours['requests_per_s']:.2f} req/s, {ours['total_tokens_per_s']:,.1f} total tok/s "
          f"({ours['fraction_of_compute_roofline']:.1%} of compute roofline), {ours['output_tokens_per_s']:,.1f} "
          f"output tok/s ({ours['fraction_of_decode_roofline']:.1%} of decode roofline)", flush=True)
    for line in format_step_mix(step_mix):
        print(line, flush=True)
    del engine, runner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    if args.baseline == "hf":
        hf = run_hf(config, requests, args.hf_batch_sizes)
        summary["hf"] = hf
        if hf["best"] is not None:
            summary["ours_over_hf_total_tokens_per_s"] = ours["total_tokens_per_s"] / hf["best"]["total_tokens_per_s"]
            summary["ours_over_hf_output_tokens_per_s"] = (ours["output_tokens_per_s"]
                                                           / hf["best"]["output_tokens_per_s"])
            print(f"ours / HF best (batch {hf['best']['batch_size']}): "
                  f"{summary['ours_over_hf_total_tokens_per_s']:.2f}x total tok/s, "
                  f"{summary['ours_over_hf_output_tokens_per_s']:.2f}x output tok/s")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
