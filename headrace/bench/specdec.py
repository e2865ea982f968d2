"""`headrace bench specdec`: speculative decoding against none, one request at a time, engine-direct, on
two kinds of chat prompts: input-grounded ones (repeat, edit or summarise a given passage or code: the
output copies the input, where prompt lookup drafts well) and free-form ones (nothing to copy: the drafts'
cost with little to gain). Both engines share one loaded model and run each prompt in turn (interleaved),
greedy, until EOS or --output-len; greedy outputs are the same with and without speculation, so both do
the same work. decode tok/s = (output tokens - 1) / (seconds after the first token).

    headrace bench specdec --speculative-config '{"method": "ngram", "num_speculative_tokens": 8,
        "prompt_lookup_min": 2, "prompt_lookup_max": 4}' --output-len 128 --output-json specdec.json
    headrace bench specdec --model random:llama-3-8b --max-model-len 2048 --speculative-config
        '{"method": "draft_model", "model": "random:llama-3.2-1b", "num_speculative_tokens": 4}'

(A draft model with random weights is accepted only where it happens to agree with the target: its speed-up
on random weights is no measure of a trained draft's.)
"""

from __future__ import annotations

import argparse
import json
import time

from headrace.common.config import SpeculativeConfig
from headrace.common.sampling_params import SamplingParams
from headrace.config_args import add_engine_args, engine_config_from_args
from headrace.engine import LLMEngine
from headrace.services.scheduler.speculation import SpecDecodeStats
from headrace.services.tokenizer.text_codec import TextCodec

DEFAULT_SPEC = SpeculativeConfig(num_speculative_tokens=8, prompt_lookup_min=2, prompt_lookup_max=4)

_CODE = ("def moving_average(values, window):\n    if window <= 0:\n        raise ValueError('window must be positive')\n"
         "    result = []\n    total = 0.0\n    for i, value in enumerate(values):\n        total += value\n"
         "        if i >= window:\n            total -= values[i - window]\n        if i >= window - 1:\n"
         "            result.append(total / window)\n    return result\n")
_PASSAGE = ("The river town of Ashford grew up around a stone bridge built in the twelfth century. For hundreds of "
            "years the bridge carried wool carts to the market square, where merchants from the coast bought "
            "fleeces and sold salt, iron and cloth. When the railway arrived in 1846 the market moved to the "
            "station yard, and the old square became a quiet garden with a fountain and a row of lime trees.")
GROUNDED = [
    f"Repeat the following code exactly, with the function renamed to rolling_mean:\n\n{_CODE}",
    f"Add a docstring to this function and return the whole function:\n\n{_CODE}",
    f"Copy the following passage, replacing 'Ashford' with 'Millbrook':\n\n{_PASSAGE}",
    f"Fix any typos in this passage and return it in full:\n\n{_PASSAGE}",
]
FREE_FORM = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how vaccines train the immune system, for a twelve-year-old.",
    "Give me five ideas for a weekend trip in the mountains, with a sentence on each.",
    "What are the trade-offs between trains and planes for a 600 km journey?",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headrace bench specdec", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    b = p.add_argument_group("benchmark")
    b.add_argument("--output-len", type=int, default=128, help="max tokens per request (greedy, stops at EOS)")
    b.add_argument("--num-iters", type=int, default=1, help="passes over the prompts (timed, after one warm-up)")
    b.add_argument("--output-json", default=None)
    return p


def timed_request(engine: LLMEngine, prompt: list[int], max_tokens: int, tag: str) -> tuple[list[int], float, float]:
    """(output tokens, seconds to the first token, seconds to the end) of one request alone."""
    engine.add_request(tag, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    tokens: list[int] = []
    t0 = time.perf_counter()
    first = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
        if first is None and tokens:
            first = time.perf_counter() - t0
    return tokens, first or 0.0, time.perf_counter() - t0


def measure_set(plain: LLMEngine, spec: LLMEngine, prompts: list[list[int]], args: argparse.Namespace,
                name: str) -> dict:
    """Both engines over one prompt set, prompt by prompt; tokens/s of each and the drafts' acceptance."""
    stats: SpecDecodeStats = spec.scheduler.speculation.stats
    before = SpecDecodeStats(stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens,
                             list(stats.accepted_per_pos))
    decode = {"plain": [0.0, 0], "spec": [0.0, 0]}  # seconds after the first token, tokens after the first
    e2e = {"plain": [0.0, 0], "spec": [0.0, 0]}
    differing = 0  # prompts whose greedy output changed with speculation
    for it in range(args.num_iters):
        for i, prompt in enumerate(prompts):
            runs = {}
            for label, engine in (("plain", plain), ("spec", spec)):
                tokens, first, total = timed_request(engine, prompt, args.output_len, f"{name}-{label}-{it}-{i}")
                runs[label] = tokens
                decode[label][0] += total - first
                decode[label][1] += len(tokens) - 1
                e2e[label][0] += total
                e2e[label][1] += len(tokens)
            # Equal on the exact CPU float32 path; on a GPU a verify step may round a near-tie differently.
            differing += runs["plain"] != runs["spec"]
    drafts = stats.num_drafts - before.num_drafts
    accepted = stats.num_accepted_tokens - before.num_accepted_tokens
    per_pos = [n - (before.accepted_per_pos[k] if k < len(before.accepted_per_pos) else 0)
               for k, n in enumerate(stats.accepted_per_pos)]
    result = {"prompts": len(prompts), "output_tokens": e2e["plain"][1] // max(args.num_iters, 1),
              "outputs_differing": differing}
    if differing:
        print(f"{name}: {differing} greedy outputs differ with speculation", flush=True)
    for label in ("plain", "spec"):
        result[f"{label}_decode_tokens_per_s"] = decode[label][1] / decode[label][0]
        result[f"{label}_output_tokens_per_s"] = e2e[label][1] / e2e[label][0]
    result["decode_speedup"] = result["spec_decode_tokens_per_s"] / result["plain_decode_tokens_per_s"]
    result["output_speedup"] = result["spec_output_tokens_per_s"] / result["plain_output_tokens_per_s"]
    result["num_drafts"] = drafts
    result["num_draft_tokens"] = stats.num_draft_tokens - before.num_draft_tokens
    result["num_accepted_tokens"] = accepted
    result["mean_acceptance_length"] = 1.0 + accepted / drafts if drafts else 1.0
    result["acceptance_rate_per_pos"] = [n / drafts if drafts else 0.0 for n in per_pos]
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = engine_config_from_args(args)
    spec_config = config.speculative or DEFAULT_SPEC
    # The speculative engine loads the runner (with its draft model, for method draft_model); the plain one
    # shares it and never drafts.
    spec = LLMEngine(config.replace(speculative=spec_config))
    plain = LLMEngine(spec.config.replace(speculative=None), runner=spec.runner)
    model = plain.config.require_resolved()
    codec = TextCodec.load(model.tokenizer_dir, config.model.chat_template, model.max_model_len)
    sets = {name: [codec.encode_chat([{"role": "user", "content": text}])[0] for text in texts]
            for name, texts in (("grounded", GROUNDED), ("free_form", FREE_FORM))}
    timed_request(plain, sets["grounded"][0], 8, "warm-plain")  # first-call costs out of the timings
    timed_request(spec, sets["grounded"][0], 8, "warm-spec")
    results = {name: measure_set(plain, spec, prompts, args, name) for name, prompts in sets.items()}
    summary = {"benchmark": "specdec", "model": config.model.model or "embedded", "device": str(plain.runner.device),
               "speculative_config": spec_config.__dict__, "output_len": args.output_len,
               "num_iters": args.num_iters, "results": results}
    print(format_table(summary))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def format_table(summary: dict) -> str:
    lines = [f"speculative decoding on {summary['device']} ({summary['model']}, batch 1, "
             f"{json.dumps(summary['speculative_config'])})",
             f"{'prompts':>10} {'tokens':>7} {'plain tok/s':>12} {'spec tok/s':>11} {'speed-up':>9} "
             f"{'accept len':>11}  per-position acceptance"]
    for name, r in summary["results"].items():
        lines.append(f"{name:>10} {r['output_tokens']:>7} {r['plain_decode_tokens_per_s']:>12.1f} "
                     f"{r['spec_decode_tokens_per_s']:>11.1f} {r['decode_speedup']:>8.2f}x "
                     f"{r['mean_acceptance_length']:>11.2f}  "
                     + " ".join(f"{x:.2f}" for x in r["acceptance_rate_per_pos"]))
    lines.append("(decode tok/s: tokens after the first, over the seconds after the first token)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
