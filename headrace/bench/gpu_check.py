"""The whole GPU check in one call (device tool): correctness of our bf16 engine against transformers on the
same random weights of a real shape, the kernel tests at real shapes, and the headline speed numbers.

Usage on the device machine (see scripts/gpu_check.sh):  python -m headrace.bench.gpu_check --out $OUT [--sections ...]
Writes $OUT/gpu_check.json and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch


def device_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        smi = f"nvidia-smi failed: {exc}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"gpu": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "nvidia_smi": smi,
            "torch": torch.__version__, "cuda": torch.version.cuda, "commit": commit or "unknown",
            "date": time.strftime("%Y-%m-%d")}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def per_position_rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[P] relative error of each position's logits row."""
    return (a.float() - b.float()).norm(dim=-1) / b.float().norm(dim=-1)


def bf16_verdict(ours: torch.Tensor, hf_bf16: torch.Tensor, fp32: torch.Tensor) -> dict:
    """Ours and transformers' bf16 logits [P, V], each against fp32. Judged by the median position: in a
    mixture of experts two experts' scores can sit within bf16's noise of each other, and the pick between
    them, a coin flip for any bf16 engine (transformers' included), moves that one position's logits by tens of
    percent (random Mixtral weights: 1 to 3 % of positions per layer pick another expert than float32). The
    positions far off (over 5x transformers' median) are counted for both, so a systematic error still shows:
    it moves the median, and it puts far more positions far off than transformers has."""
    ours_err, hf_err = per_position_rel_err(ours, fp32), per_position_rel_err(hf_bf16, fp32)
    ours_med, hf_med = float(ours_err.median()), float(hf_err.median())
    far = 5 * max(hf_med, 1e-3)
    ours_far, hf_far = int((ours_err > far).sum()), int((hf_err > far).sum())
    return {"median_rel_err_vs_hf_fp32": ours_med, "hf_bf16_median_rel_err_vs_fp32": hf_med,
            "positions_far_off": ours_far, "hf_bf16_positions_far_off": hf_far,
            # bf16 tolerance: the median within 1.5x of transformers' own (+ a floor), and at most a few more
            # coin-flip positions than transformers had.
            "pass": ours_med <= max(1.5 * hf_med, 1e-2) and ours_far <= 2 * hf_far + max(1, len(ours_err) // 16)}


def hf_model_with(runner, state: dict[str, torch.Tensor], dtype: torch.dtype, device: str):
    """transformers' model of the runner's config in `dtype`, holding `state` (our weights under its names);
    refused when any of its weights would be left at their random init."""
    from transformers import AutoModelForCausalLM

    from headrace.bench.hf_baseline import hf_attention, take_our_weights

    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(runner.hf_config, dtype=dtype,
                                              attn_implementation=hf_attention(runner.hf_config))
    take_our_weights(hf, state, runner.arch.tie_word_embeddings)
    return hf.eval()


def check_init_std(hidden_size: int) -> float:
    """The std of the random weights a logits check draws: transformers' 0.02 up to hidden 1,024, scaled by
    sqrt(1024 / hidden) beyond. At 0.02 and a real width, q.k grows with the width and attention turns near
    one-hot: bf16 noise then flips which key wins, and even transformers' own bf16 is far from its fp32
    (Gemma-2-9B's width, 21 layers, 256 tokens on a CPU: 72% median relative error at 0.02, 2.5% at 0.01)."""
    return 0.02 * min(1.0, (1024 / hidden_size) ** 0.5)


@torch.no_grad()
def check_logits(preset: str, backend: str, tokenizer: str | None, prompt_len: int = 512,
                 decode_steps: int = 32, device: str = "cuda", init_std: float | None = None) -> dict:
    """Our bf16 logits vs transformers bf16 and fp32 on the same weights: prefill and paged decode steps.
    `init_std`: the random weights' std (None: check_init_std of the preset's width)."""
    from headrace.common.models.presets import PRESETS
    from headrace.common.config import CacheConfig, EngineConfig, ModelConfig
    from headrace.common.models.resolve import resolve_engine_config
    from headrace.common.sampling_params import SamplingParams
    from headrace.services.gpu_worker.loader.model_loader import export_hf_state_dict
    from headrace.services.gpu_worker.model_runner import ModelRunner
    from tests.services.gpu_worker.plan_driver import PlanDriver, capture_logits

    init_std = init_std or check_init_std(PRESETS[preset]["hidden_size"])
    cfg = EngineConfig(model=ModelConfig(model=f"random:{preset}", dtype="bfloat16", seed=1,
                                         random_init_std=init_std, tokenizer=tokenizer,
                                         max_model_len=prompt_len + decode_steps + 16),
                       cache=CacheConfig(num_blocks=512), attention_backend=backend, device=device)
    runner = ModelRunner(resolve_engine_config(cfg), log=print)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, runner.arch.vocab_size, (prompt_len,), generator=gen).tolist()

    # Ours: greedy continuation through the paged cache, logits captured for every sampled position.
    original = runner.model.compute_logits
    captured = capture_logits(runner)
    (ours_tokens,) = PlanDriver(runner).generate([prompt], SamplingParams(temperature=0.0), decode_steps)
    runner.model.compute_logits = original
    ours = torch.cat(captured)  # [decode_steps, V]: logits at the last prompt position and each decode step
    full = prompt + ours_tokens[:-1]
    positions = list(range(prompt_len - 1, prompt_len - 1 + decode_steps))

    state = {k: v.detach() for k, v in export_hf_state_dict(runner.model).items()}
    result = {"preset": preset, "backend": runner.backend.name, "prompt_len": prompt_len,
              "decode_steps": decode_steps, "init_std": init_std}
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        hf = hf_model_with(runner, state, dtype, device)
        logits = hf(torch.tensor([full], device=device)).logits[0, positions].float().cpu()
        result[f"hf_{dtype_name}_tokens_agree"] = logits.argmax(-1).tolist() == ours_tokens
        result[f"rel_err_vs_hf_{dtype_name}"] = rel_err(ours, logits)
        result[f"max_abs_vs_hf_{dtype_name}"] = float((ours - logits).abs().max())
        if dtype_name == "bf16":
            hf_bf16 = logits
        else:
            result["hf_bf16_rel_err_vs_fp32"] = rel_err(hf_bf16, logits)
            result.update(bf16_verdict(ours, hf_bf16, logits))
        del hf
        _empty_cache(device)
    del runner
    _empty_cache(device)
    return result


def _empty_cache(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def run_pytest(paths: list[str]) -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *paths],
                          capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    return {"paths": paths, "returncode": proc.returncode, "summary": tail, "seconds": round(time.time() - t0, 1),
            "log_tail": (proc.stdout + proc.stderr)[-4000:]}


SECTIONS = {
    "logits": lambda a: [check_logits(a.preset, b, a.tokenizer, a.prompt_len) for b in a.backends],
    "kernels": lambda a: run_pytest(["tests/kernels"]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS))
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--backends", nargs="+", default=["torch"])
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for random-weight presets")
    ap.add_argument("--prompt-len", type=int, default=512,
                    help="longer than a sliding window (<= 2040) to check windowed layers past their window")
    args = ap.parse_args()
    results: dict = {"device": device_info()}
    print(json.dumps(results["device"]))
    for name in args.sections:
        t0 = time.time()
        try:
            results[name] = SECTIONS[name](args)
        except Exception:  # noqa: BLE001 - one failing section must not lose the others' numbers
            results[name] = {"error": traceback.format_exc()[-3000:]}
        text = json.dumps(results[name])  # long: its head and tail (where a traceback names the error)
        text = text if len(text) <= 1500 else f"{text[:600]} ... {text[-900:]}"
        print(f"[{name}] {time.time() - t0:.1f}s: {text}", flush=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
