"""Tiny random Llama / Mistral / Qwen2 / Qwen3 configs: our logits match transformers' on the same weights,
for a full prefill and for decode steps read back through the paged cache."""

from __future__ import annotations

import pytest
import torch

from headrace.bench.hf_baseline import take_our_weights
from headrace.common.config import CacheConfig, EngineConfig, ModelConfig
from headrace.common.messages import CachedRequestData, NewRequestData, StepPlan
from headrace.common.sampling_params import SamplingParams
from headrace.services.gpu_worker.batch_inputs import prepare_batch
from headrace.services.gpu_worker.loader.model_loader import export_hf_state_dict
from headrace.services.gpu_worker.model_runner import ModelRunner
from tests.configs import resolved

PRESETS = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-llama3-scaled"]


def hf_twin(runner: ModelRunner):
    from transformers import AutoModelForCausalLM

    # float32 on the runner's device, whatever the runner's dtype: the oracle.
    hf = AutoModelForCausalLM.from_config(runner.hf_config, dtype=torch.float32).to(runner.device)
    ours = {name: t.float() for name, t in export_hf_state_dict(runner.model).items()}
    take_our_weights(hf, ours, runner.arch.tie_word_embeddings)
    return hf.eval()


def logits_for_all_positions(runner: ModelRunner, prompt: list[int], chunk: int) -> torch.Tensor:
    """Run the prompt through the paged cache in chunks and collect the logits of every position."""
    bs = runner.block_size
    blocks = list(range(3, 3 + -(-len(prompt) // bs)))[::-1]  # non-contiguous, reversed physical blocks
    rows = []
    for start in range(0, len(prompt), chunk):
        n = min(chunk, len(prompt) - start)
        plan = StepPlan(step_id=start)
        if start == 0:
            plan.new_requests.append(NewRequestData("r", prompt, [], SamplingParams(temperature=0.0), blocks, 0, 0))
        else:
            plan.cached_requests.append(CachedRequestData("r", [], start))
        plan.num_scheduled_tokens["r"] = n
        runner._apply_plan(plan)
        batch = prepare_batch(runner.requests, plan.num_scheduled_tokens, runner.block_size, runner.device,
                              long_rope=runner.long_rope)
        from headrace.services.gpu_worker.model.llama import ForwardContext

        ctx = ForwardContext(batch.attn, runner.kv_caches, runner.backend, runner.cos_sin_cache)
        with torch.no_grad():
            hidden = runner.model(batch.input_ids, batch.positions, ctx)
            rows.append(runner.model.compute_logits(hidden))
        runner.requests["r"].num_computed_tokens = start + n
    runner.requests.pop("r")
    return torch.cat(rows)


def ours_and_reference(runner: ModelRunner, hf, prompt: list[int], chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our logits for every prompt position (through the paged cache, `chunk` tokens a step) and the HF
    model's for the whole prompt at once, both float32 on the CPU."""
    ours = logits_for_all_positions(runner, prompt, chunk)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt], device=hf.device)).logits[0]
    return ours.float().cpu(), ref.float().cpu()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("chunk", [1000, 5, 1])
def test_logits_match_transformers(preset, chunk):
    cfg = EngineConfig(model=ModelConfig(model=f"random:{preset}", seed=7, max_model_len=512),
                       cache=CacheConfig(num_blocks=64))
    runner = ModelRunner(resolved(cfg), log=lambda *_: None)
    hf = hf_twin(runner)
    prompt = torch.randint(0, runner.arch.vocab_size, (37,), generator=torch.Generator().manual_seed(3)).tolist()
    ours, ref = ours_and_reference(runner, hf, prompt, chunk)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
