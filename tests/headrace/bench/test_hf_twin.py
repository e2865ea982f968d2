"""The benchmarks' HF baseline holds our weights without copying them (an assigning load onto a meta-device
model, computed buffers rebuilt), and computes what our engine computes: dense, tied, RoPE-scaled and MoE."""

from __future__ import annotations

import pytest
import torch

from headrace.bench.hf_baseline import load_hf_twin
from headrace.common.config import CacheConfig, EngineConfig, ModelConfig
from headrace.services.gpu_worker.model_runner import ModelRunner
from tests.configs import resolved
from tests.services.gpu_worker.test_models_vs_hf import ours_and_reference


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-llama3-scaled", "tiny-mixtral"])
def test_hf_twin_has_every_tensor_on_the_device_and_our_logits(preset):
    cfg = EngineConfig(model=ModelConfig(model=f"random:{preset}", seed=7, max_model_len=512),
                       cache=CacheConfig(num_blocks=32), device="cpu")
    hf = load_hf_twin(cfg, log=lambda *_: None)
    assert not any(t.is_meta for t in (*hf.parameters(), *hf.buffers()))
    runner = ModelRunner(resolved(cfg), log=lambda *_: None)
    ours, ref = ours_and_reference(runner, hf, list(range(3, 30)), 1000)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
