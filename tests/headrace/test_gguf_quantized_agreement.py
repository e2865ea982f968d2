"""The embedded GGUF served kept quantized (`--dtype bfloat16` on CPU: int4 kernel, bf16 products) picks the same
greedy token as a float32 forward over the same dequantized weights (transformers on the float folder) at
most positions of 8 prompts x 64 generated tokens. Each position is compared on the quantized path's own
prefix (teacher forcing), so one near-tie does not count every later token as a miss.

Issue 21 asks for 98%; measured here: 507 of 512 (99.0%). Each product's output is rounded to bf16 (both
operators return bf16), and at the LM head that decided near-ties: 497 of 512 until the logits near each
row's max were recomputed in float32 (GGUFLinear.refine_near_max, 502), then 507 with the bf16 RMSNorm
rounding once instead of twice. The bar is two tokens under the measured figure: a CPU whose kernels block
the sums differently may move a near-tie or two."""

from __future__ import annotations

import pytest
import torch

from headrace.common.sampling_params import SamplingParams
from headrace.llm import LLM

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers greater than 50:",
    "Why is the sky blue?",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics are",
]
NEW_TOKENS = 64


@pytest.mark.slow
def test_quantized_greedy_tokens_agree_with_the_float32_forward(embedded_hf_model):
    # One thread: a parallel kernel on oversubscribed cores waits for time slices (docs/cpu.md).
    llm = LLM("", device="cpu", dtype="bfloat16", max_model_len=512, cpu_threads=1, log=lambda *_: None)
    assert llm.config.require_resolved().quantization.kind == "gguf"
    model = llm.engine.runner.model  # the tied head's dense copy (many-row products) is the embedding table
    assert model.lm_head.batched_dense.data_ptr() == model.embed_tokens.weight.data_ptr()
    outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    agree, total = agreement(embedded_hf_model, outputs)
    assert agree / total >= 0.986, f"{agree}/{total} tokens agree"


PARAMS = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


def agreement(hf_model, outputs) -> tuple[int, int]:
    """Positions where the output's token is the float32 forward's greedy choice on the output's own prefix,
    and positions compared."""
    agree = total = 0
    with torch.no_grad():
        for out in outputs:
            prompt, generated = out.prompt_token_ids, out.outputs[0].token_ids
            assert len(generated) == NEW_TOKENS
            logits = hf_model(torch.tensor([prompt + generated])).logits[0]
            float_choice = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
            agree += sum(a == b for a, b in zip(float_choice, generated))
            total += NEW_TOKENS
    return agree, total


@pytest.mark.slow
def test_compiled_decode_steps_agree_as_well(embedded_hf_model):
    """--compile-decode's three graphs (one row, 2-9 rows, ten rows or more) on the same bar: measured 510/512
    with each prompt alone (eager: 506) and 756/768 for twelve together (eager: 756), two threads."""
    lines = []
    llm = LLM("", device="cpu", dtype="bfloat16", max_model_len=512, cpu_threads=1, compile_decode=True,
              log=lines.append)
    compiled = llm.engine.runner.compiled_decode
    assert compiled is not None, lines
    assert sum("--compile-decode: graph for" in line for line in lines) == 3, lines
    assert compiled.num_direct == 3  # every graph called without dynamo's guard check
    assert [compiled.graph_for(rows).wrapper for rows in (1, 2, 10)] == ["C++", "Python", "Python"]
    alone = [llm.generate([p], PARAMS, use_tqdm=False)[0] for p in PROMPTS]
    agree, total = agreement(embedded_hf_model, alone)
    assert agree / total >= 0.986, f"alone: {agree}/{total} tokens agree"
    replays = compiled.num_replays
    assert replays >= len(PROMPTS) * (NEW_TOKENS - 16)  # every decode step past the first block of context
    together = llm.generate(PROMPTS + EXTRA_PROMPTS, PARAMS, use_tqdm=False)
    agree, total = agreement(embedded_hf_model, together)
    assert agree / total >= 0.98, f"together: {agree}/{total} tokens agree"
    assert compiled.num_replays > replays + NEW_TOKENS // 2
    replays = compiled.num_replays
    four = llm.generate(PROMPTS[:4], PARAMS, use_tqdm=False)
    agree, total = agreement(embedded_hf_model, four)
    assert agree / total >= 0.98, f"four together: {agree}/{total} tokens agree"
    assert compiled.num_replays > replays + NEW_TOKENS // 2


EXTRA_PROMPTS = ["Tell me a joke.", "What is 2+2?", "Name a color.", "Describe a cat."]
