"""`headrace bench latency`: decode speed of one batch at a time, engine-direct, against the memory roofline
measured in the same run, and (`--baseline hf`) transformers' `generate` on the same weights and prompts, or
(`--baseline llamacpp`, a GGUF model) llama.cpp on the same file, interleaved with our iterations.

Each iteration submits --batch-size random prompts of --input-len tokens that ask for exactly --output-len
tokens (greedy, EOS ignored) and steps the engine until they finish. Up to the step that gives every
request its first token is prefill; the rest is decode:
    per-output-token latency = decode seconds / (output_len - 1)
    decode tokens/s = batch x (output_len - 1) / decode seconds
The memory roofline of a decode step reads every weight once plus the batch's KV at its mean decode
context (input_len + output_len / 2), at the copy bandwidth measured before the engine starts.

    headrace bench latency --model random:llama-3-8b --input-len 128 --output-len 128 --batch-size 1 32 \
        --num-iters-warmup 2 --num-iters 5 --baseline hf --output-json latency.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import time

import numpy as np
import torch

from headrace.common.config import EngineConfig
from headrace.common.sampling_params import SamplingParams
from headrace.bench import hf_baseline, llamacpp_baseline, roofline
from headrace.config_args import add_engine_args, engine_config_from_args
from headrace.engine import LLMEngine


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headrace bench latency", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    b = p.add_argument_group("benchmark")
    b.add_argument("--input-len", type=int, default=32)
    b.add_argument("--output-len", type=int, default=128)
    b.add_argument("--batch-size", type=int, nargs="+", default=[1, 8], help="one or more batch sizes")
    b.add_argument("--num-iters-warmup", type=int, default=10)
    b.add_argument("--num-iters", type=int, default=30)
    b.add_argument("--output-json", default=None)
    b.add_argument("--baseline", choices=["hf", "llamacpp"], default=None,
                   help="also time transformers' generate on the same weights and prompts, or llama.cpp "
                        "(llama-cpp-python, when importable) on the same GGUF, one sequence, interleaved")
    b.add_argument("--hf-num-iters", type=int, default=2,
                   help="timed HF generate calls per batch size (at most --num-iters)")
    return p


def run_batch(engine: LLMEngine, prompts: list[list[int]], output_len: int, tag: str) -> tuple[float, float]:
    """(seconds until every request has its first token, seconds until all finished)."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    t0 = time.perf_counter()
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    counts = dict.fromkeys(ids, 0)
    started = 0
    ttft = None
    while engine.has_unfinished_requests():
        for out in engine.step():  # each step ends with the sampled tokens on the host: timers are exact
            if counts[out.req_id] == 0:
                started += 1
            counts[out.req_id] += len(out.new_token_ids)
        if ttft is None and started == len(ids):
            ttft = time.perf_counter() - t0
    e2e = time.perf_counter() - t0
    if any(n != output_len for n in counts.values()):
        raise RuntimeError(f"expected {output_len} tokens per request, got {sorted(set(counts.values()))} "
                           "(is --max-model-len below input + output?)")
    return ttft, e2e


def decode_stats(batch: int, output_len: int, e2e: list[float], first: list[float]) -> dict:
    decode = statistics.median(e - f for e, f in zip(e2e, first))
    steps = output_len - 1
    return {
        "e2e_latency_s_median": statistics.median(e2e),
        "e2e_latency_s_mean": statistics.fmean(e2e),
        "e2e_latency_s_p99": float(np.percentile(e2e, 99)),
        "prefill_s_median": statistics.median(first),
        "decode_s_median": decode,
        "per_output_token_latency_ms": decode / steps * 1e3,
        "decode_tokens_per_s": batch * steps / decode,
        "output_tokens_per_s": batch * output_len / statistics.median(e2e),
    }


def random_prompts(rng: np.random.Generator, batch: int, length: int, vocab: int) -> list[list[int]]:
    return rng.integers(0, vocab, size=(batch, length)).tolist()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.output_len < 2:
        raise SystemExit("--output-len must be >= 2 (decode latency needs at least one decode step)")
    if args.num_iters < 1 or args.hf_num_iters < 1 or args.input_len < 1 or min(args.batch_size) < 1:
        raise SystemExit("--num-iters, --hf-num-iters, --input-len and --batch-size must be >= 1")
    config: EngineConfig = engine_config_from_args(args)
    if max(args.batch_size) > config.scheduler.max_num_seqs:
        raise SystemExit(f"--batch-size {max(args.batch_size)} exceeds --max-num-seqs {config.scheduler.max_num_seqs}")
    rates = roofline.measure_for_engine(config)  # before the engine claims the GPU's memory

    llama = LlamaCppRuns(config, args) if args.baseline == "llamacpp" else None
    summary, hf_prompts = measure_engine(config, args, rates, llama.run if llama else None)
    if llama is not None:
        llama.add_to(summary)
    if config.model.quantization is not None:
        # The same prompts on the same weights unquantized, in the same run: the speed-up is the point.
        dense = config.replace(model=dataclasses.replace(config.model, quantization=None), resolved=None)
        dense_summary, _ = measure_engine(dense, args, rates)
        summary["unquantized_step_weight_bytes"] = dense_summary["step_weight_bytes"]
        for res, base in zip(summary["results"], dense_summary["results"]):
            res["unquantized"] = base["ours"]
            res["quantized_over_unquantized_decode_tokens_per_s"] = (res["ours"]["decode_tokens_per_s"]
                                                                     / base["ours"]["decode_tokens_per_s"])
    if args.baseline == "hf":
        run_hf_baseline(config, args, summary["results"], hf_prompts)

    print(format_table(summary))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def measure_engine(config: EngineConfig, args: argparse.Namespace, rates, between=None) -> tuple[dict, dict]:
    """Our decode speed at each batch size (random prompts from --seed, so reruns see the same prompts);
    returns the summary and, per batch size, the timed prompts for the HF baseline. `between(prompts)` runs
    after each timed iteration (an interleaved baseline)."""
    engine = LLMEngine(config)
    runner = engine.runner
    # Weights are counted as stored (step_weight_bytes), so nbytes is the KV cache's element size (fp8: 1).
    arch, nbytes = runner.arch, roofline.dtype_bytes(runner.kv_layout.dtype)
    weight_bytes = roofline.step_weight_bytes(runner.model)
    rng = np.random.default_rng(args.seed)
    mean_context = args.input_len + args.output_len / 2
    results, hf_prompts = [], {}
    for batch in args.batch_size:
        sets = [random_prompts(rng, batch, args.input_len, arch.vocab_size)
                for _ in range(args.num_iters_warmup + args.num_iters)]
        for i in range(args.num_iters_warmup):
            run_batch(engine, sets[i], args.output_len, f"warm{batch}-{i}")
        timed = sets[args.num_iters_warmup:]
        runs = []
        for i, prompts in enumerate(timed):
            runs.append(run_batch(engine, prompts, args.output_len, f"b{batch}-{i}"))
            if between is not None:
                between(prompts)
        ours = decode_stats(batch, args.output_len, [e for _, e in runs], [f for f, _ in runs])
        bound = roofline.decode_roofline_tokens_per_s(rates, arch, nbytes, batch, mean_context,
                                                      roofline.step_weight_bytes(runner.model, batch))
        ours["memory_roofline_decode_tokens_per_s"] = bound
        ours["fraction_of_memory_roofline"] = ours["decode_tokens_per_s"] / bound
        results.append({"batch_size": batch, "ours": ours})
        hf_prompts[batch] = timed[: args.hf_num_iters]
        print(f"batch {batch}: {ours['per_output_token_latency_ms']:.2f} ms/token, "
              f"{ours['decode_tokens_per_s']:,.1f} decode tok/s = {ours['fraction_of_memory_roofline']:.1%} "
              f"of the memory roofline ({bound:,.1f})", flush=True)
    summary = {
        "benchmark": "latency", "model": config.model.model or "embedded",
        "dtype": str(runner.dtype).removeprefix("torch."), "quantization": config.model.quantization,
        "kv_cache_dtype": config.cache.kv_cache_dtype,
        "device": rates.device, "attention_backend": runner.backend.name,
        "cuda_graphs": runner.decode_graphs is not None,
        "compiled_decode": runner.compiled_decode is not None,
        "graph_batch_sizes": runner.decode_graphs.sizes if runner.decode_graphs is not None else [],
        "rates": rates.to_dict(), "step_weight_params": roofline.step_weight_params(arch),
        "step_weight_bytes": weight_bytes, "kv_bytes_per_token": roofline.kv_bytes_per_token(arch, nbytes),
        "input_len": args.input_len, "output_len": args.output_len, "num_iters": args.num_iters,
        "num_iters_warmup": args.num_iters_warmup, "results": results,
    }
    spec = engine.scheduler.speculation
    if spec is not None:  # acceptance over every iteration, warm-ups included
        summary["spec_decode"] = spec_decode_summary(spec.stats)
        print(format_spec_decode(summary["spec_decode"]), flush=True)
    del engine, runner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return summary, hf_prompts


def spec_decode_summary(stats) -> dict:
    """Speculative decoding's counters (SpecDecodeStats) as the benchmark reports them."""
    n = stats.num_drafts
    return {"num_drafts": n, "num_draft_tokens": stats.num_draft_tokens,
            "num_accepted_tokens": stats.num_accepted_tokens,
            "acceptance_rate": stats.num_accepted_tokens / stats.num_draft_tokens if stats.num_draft_tokens else 0.0,
            "mean_acceptance_length": stats.mean_acceptance_length,
            "acceptance_rate_per_pos": [k / n for k in stats.accepted_per_pos] if n else []}


def format_spec_decode(s: dict) -> str:
    return (f"speculative decoding: {s['num_drafts']} verify steps, mean acceptance length "
            f"{s['mean_acceptance_length']:.2f}, {s['acceptance_rate']:.1%} of {s['num_draft_tokens']} drafts "
            "accepted; by position " + " ".join(f"{x:.2f}" for x in s["acceptance_rate_per_pos"]))


class LlamaCppRuns:
    """llama.cpp's timed generations, one per timed engine iteration (its first prompt), one sequence each."""

    def __init__(self, config: EngineConfig, args: argparse.Namespace):
        self.args = args
        self.threads = config.parallel.cpu_threads or len(os.sched_getaffinity(0))  # as many as our worker
        try:
            self.llm = llamacpp_baseline.load(config, args.input_len + args.output_len + 8, self.threads)
        except llamacpp_baseline.BaselineUnavailable as e:
            raise SystemExit(str(e)) from None
        llamacpp_baseline.timed_generate(self.llm, list(range(1, args.input_len + 1)), 4)  # warm-up
        self.runs: list[tuple[float, float]] = []

    def run(self, prompts: list[list[int]]) -> None:
        self.runs.append(llamacpp_baseline.timed_generate(self.llm, prompts[0], self.args.output_len))

    def add_to(self, summary: dict) -> None:
        first, e2e = [f for f, _ in self.runs], [e for _, e in self.runs]
        stats = decode_stats(1, self.args.output_len, e2e, first)
        stats["threads"] = self.threads
        summary["llamacpp"] = stats
        for res in summary["results"]:
            res["ours_over_llamacpp_decode_tokens_per_s"] = (res["ours"]["decode_tokens_per_s"]
                                                             / stats["decode_tokens_per_s"])
        summary["results"][0]["ours_over_llamacpp_prefill_s"] = (summary["results"][0]["ours"]["prefill_s_median"]
                                                                 / stats["prefill_s_median"])


def run_hf_baseline(config: EngineConfig, args: argparse.Namespace, results: list[dict], hf_prompts: dict) -> None:
    """transformers' generate on the same (dense) weights and prompts, added to each batch size's result."""
    hf = hf_baseline.load_hf_twin(config)
    hf_baseline.timed_generate(hf, hf_prompts[args.batch_size[0]][0], 2)  # warm-up: kernels, handles
    for res in results:
        batch = res["batch_size"]
        prompts = hf_prompts[batch]
        e2e, first = zip(*(hf_baseline.timed_generate_split(hf, p, args.output_len) for p in prompts))
        stats = decode_stats(batch, args.output_len, list(e2e), list(first))
        stats["fraction_of_memory_roofline"] = (stats["decode_tokens_per_s"]
                                                / res["ours"]["memory_roofline_decode_tokens_per_s"])
        res["hf"] = stats
        res["ours_over_hf_decode_tokens_per_s"] = res["ours"]["decode_tokens_per_s"] / stats["decode_tokens_per_s"]
        res["ours_over_hf_output_tokens_per_s"] = res["ours"]["output_tokens_per_s"] / stats["output_tokens_per_s"]
    del hf


def format_table(summary: dict) -> str:
    quant = f", {summary['quantization']}: weights {summary['step_weight_bytes'] / 2**30:.2f} GiB" \
        if summary.get("quantization") else ""
    lines = [f"latency on {summary['device']} ({summary['model']}, {summary['dtype']}{quant}, "
             f"in {summary['input_len']} / out {summary['output_len']}, cuda graphs {summary['cuda_graphs']}"
             + (", compiled decode" if summary.get("compiled_decode") else "") + ")",
             f"{'batch':>6} {'ms/token':>9} {'decode tok/s':>13} {'roofline':>10} {'% roof':>7} "
             f"{'HF tok/s':>10} {'ours/HF':>8}"]
    for r in summary["results"]:
        o, hf = r["ours"], r.get("hf")
        lines.append(f"{r['batch_size']:>6} {o['per_output_token_latency_ms']:>9.2f} "
                     f"{o['decode_tokens_per_s']:>13,.1f} "
                     f"{o['memory_roofline_decode_tokens_per_s']:>10,.1f} {o['fraction_of_memory_roofline']:>7.1%} "
                     + (f"{hf['decode_tokens_per_s']:>10,.1f} {r['ours_over_hf_decode_tokens_per_s']:>7.2f}x"
                        if hf else f"{'-':>10} {'-':>8}")
                     + (f"   unquantized {r['unquantized']['decode_tokens_per_s']:,.1f} tok/s, "
                        f"{r['quantized_over_unquantized_decode_tokens_per_s']:.2f}x" if "unquantized" in r else "")
                     + (f"   {r['ours_over_llamacpp_decode_tokens_per_s']:.2f}x llama.cpp's single stream"
                        if "ours_over_llamacpp_decode_tokens_per_s" in r else ""))
    llama = summary.get("llamacpp")
    if llama:
        lines.append(f"llama.cpp (same GGUF, batch 1, {llama['threads']} threads, interleaved): "
                     f"{llama['per_output_token_latency_ms']:.2f} ms/token, {llama['decode_tokens_per_s']:,.1f} "
                     f"decode tok/s, prefill {llama['prefill_s_median'] * 1e3:.1f} ms (ours "
                     f"{summary['results'][0]['ours']['prefill_s_median'] * 1e3:.1f} ms at batch "
                     f"{summary['results'][0]['batch_size']})")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
