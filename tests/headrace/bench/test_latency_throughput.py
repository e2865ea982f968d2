"""`headrace bench latency` and `throughput` run end to end on CPU (tiny random model, a handful of
requests, the HF baseline too) and write JSON whose counts add up. Timings are never asserted."""

from __future__ import annotations

import json
import math

from headrace import cli

MODEL = ["--model", "random:tiny-llama", "--device", "cpu", "--max-model-len", "256"]


def positive(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def test_latency_json(tmp_path):
    out = tmp_path / "latency.json"
    assert cli.main(["bench", "latency", *MODEL, "--input-len", "8", "--output-len", "5", "--batch-size", "1", "3",
                     "--num-iters-warmup", "1", "--num-iters", "2", "--baseline", "hf",
                     "--output-json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "latency" and data["model"] == "random:tiny-llama"
    assert data["cuda_graphs"] is False and data["attention_backend"] == "torch"
    assert positive(data["rates"]["copy_bytes_per_s"], data["rates"]["matmul_flops_per_s"])
    assert [r["batch_size"] for r in data["results"]] == [1, 3]
    for r in data["results"]:
        ours, hf = r["ours"], r["hf"]
        assert positive(ours["per_output_token_latency_ms"], ours["decode_tokens_per_s"], ours["prefill_s_median"],
                        ours["memory_roofline_decode_tokens_per_s"], ours["fraction_of_memory_roofline"],
                        hf["decode_tokens_per_s"], r["ours_over_hf_decode_tokens_per_s"])
        assert ours["e2e_latency_s_median"] > ours["decode_s_median"]
        # tokens/s and ms/token describe the same decode: batch x steps / time
        steps = data["output_len"] - 1
        assert math.isclose(ours["decode_tokens_per_s"], r["batch_size"] * steps / ours["decode_s_median"])
        assert math.isclose(ours["per_output_token_latency_ms"], ours["decode_s_median"] / steps * 1e3)


def test_throughput_json(tmp_path):
    out = tmp_path / "throughput.json"
    assert cli.main(["bench", "throughput", *MODEL, "--dataset-name", "random", "--input-len", "12",
                     "--output-len", "4", "--num-prompts", "6", "--num-warmup-prompts", "2", "--max-num-seqs", "4",
                     "--baseline", "hf", "--hf-batch-sizes", "2", "8", "--disable-tqdm",
                     "--output-json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "throughput" and data["dataset"] == "random"
    assert data["num_requests"] == 6
    assert data["input_tokens"] == 6 * 12
    assert data["output_tokens"] == data["requested_output_tokens"] == 6 * 4
    ours = data["ours"]
    assert positive(ours["requests_per_s"], ours["input_tokens_per_s"], ours["output_tokens_per_s"],
                    ours["fraction_of_compute_roofline"], ours["fraction_of_decode_roofline"])
    assert math.isclose(ours["total_tokens_per_s"], ours["input_tokens_per_s"] + ours["output_tokens_per_s"])
    assert math.isclose(ours["requests_per_s"] * ours["elapsed_s"], 6)
    assert ours["decode_roofline_batch"] == 4  # min(requests, --max-num-seqs)
    assert ours["engine_steps"] >= 4 and ours["preemptions"] == 0
    check_step_mix(data, output_len=4)
    runs = data["hf"]["runs"]
    assert [r["batch_size"] for r in runs] == [2, 6]  # batch sizes capped at the number of requests
    assert data["hf"]["best"]["total_tokens_per_s"] == max(r["total_tokens_per_s"] for r in runs)
    assert positive(data["ours_over_hf_total_tokens_per_s"], data["ours_over_hf_output_tokens_per_s"])


def step_totals(mix: dict) -> dict[str, float]:
    """The run's totals over every step kind, from the per-kind means."""
    return {key: sum(m["steps"] * m[f"mean_{key}"] for m in mix.values())
            for key in ("decode_requests", "prefill_requests", "prefill_tokens")}


def check_step_mix(data: dict, output_len: int) -> dict:
    """ours["step_mix"] accounts for every engine step, every prompt token and every decode: a request's
    first output token comes from its prefill, each further one from a 1-token decode step (EOS ignored,
    no preemption, no prefix cache: every prompt token is prefilled once)."""
    ours, mix = data["ours"], data["ours"]["step_mix"]
    assert set(mix) == {"decode_only", "mixed", "prefill_only", "empty"}
    assert sum(m["steps"] for m in mix.values()) == ours["engine_steps"]
    totals = step_totals(mix)
    assert math.isclose(totals["prefill_tokens"], data["input_tokens"])
    assert math.isclose(totals["decode_requests"], data["num_requests"] * (output_len - 1))
    assert totals["prefill_requests"] >= data["num_requests"]  # a prompt split in chunks counts once per chunk
    seconds = sum(m["seconds"] for m in mix.values())
    assert 0 < seconds <= ours["elapsed_s"]
    for m in mix.values():
        assert math.isclose(m["mean_ms_per_step"] * m["steps"], m["seconds"] * 1e3)
        # a prefill chunk here is at least 2 tokens (1-token ones would count as decodes)
        assert m["mean_prefill_tokens"] >= 2 * m["mean_prefill_requests"]
    dec, mixed, pre = mix["decode_only"], mix["mixed"], mix["prefill_only"]
    assert dec["mean_prefill_tokens"] == dec["mean_prefill_requests"] == 0
    assert pre["mean_decode_requests"] == 0
    if dec["steps"]:
        assert 1 <= dec["mean_decode_requests"] <= data["max_num_seqs"]
    if mixed["steps"]:
        assert mixed["mean_decode_requests"] >= 1 and mixed["mean_prefill_tokens"] >= 2
    if pre["steps"]:
        assert pre["mean_prefill_tokens"] >= 2
    return mix


def test_throughput_step_mix_short_prompts(tmp_path, capsys):
    """8 prompts of 12 tokens through 4 sequences and a 20-token budget: prefills are chunked and later
    admissions start beside running decodes, so the steps are decode-only, mixed and one prefill-only."""
    out = tmp_path / "throughput.json"
    assert cli.main(["bench", "throughput", *MODEL, "--dataset-name", "random", "--input-len", "12",
                     "--output-len", "6", "--num-prompts", "8", "--num-warmup-prompts", "0", "--max-num-seqs", "4",
                     "--max-num-batched-tokens", "20", "--disable-tqdm", "--output-json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["ours"]["preemptions"] == 0
    mix = check_step_mix(data, output_len=6)
    # step 1 fills the budget with prefill alone (12 + an 8-token chunk); every later step holds a decode
    assert mix["prefill_only"]["steps"] == 1 and mix["prefill_only"]["mean_prefill_tokens"] == 20
    assert mix["decode_only"]["steps"] >= 2 and mix["mixed"]["steps"] >= 2 and mix["empty"]["steps"] == 0
    # a mixed step holds at most 4 sequences within 20 tokens; decode-only steps hold no prefill
    assert mix["mixed"]["mean_decode_requests"] + mix["mixed"]["mean_prefill_requests"] <= 4
    assert mix["mixed"]["mean_decode_requests"] + mix["mixed"]["mean_prefill_tokens"] <= 20
    printed = capsys.readouterr().out
    for kind in ("decode_only", "mixed", "prefill_only"):
        assert f"step mix {kind:>12}: {mix[kind]['steps']:5d} steps" in printed
    assert "step mix        empty" not in printed


def test_throughput_sharegpt_like_counts(tmp_path):
    out = tmp_path / "throughput.json"
    assert cli.main(["bench", "throughput", *MODEL, "--max-model-len", "1024", "--dataset-name", "sharegpt-like",
                     "--num-prompts", "5", "--num-warmup-prompts", "0", "--disable-tqdm",
                     "--output-json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["dataset"] == "sharegpt-like" and data["num_requests"] == 5
    # lengths vary per request; a request stops early only at max_model_len
    assert 0 < data["output_tokens"] <= data["requested_output_tokens"]
    assert positive(data["ours"]["total_tokens_per_s"]) and "hf" not in data
