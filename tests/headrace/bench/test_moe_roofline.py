"""MoE rooflines count the bytes a step actually reads: attention, router, shared expert and the experts its
tokens route to (k of E for one token, nearly all for a large batch)."""

from __future__ import annotations

import pytest
import torch

from headrace.bench import roofline
from headrace.common.models.arch import arch_from_hf_config
from headrace.common.models.source import resolve_model


def arch(preset: str):
    return arch_from_hf_config(resolve_model(f"random:{preset}").hf_config())


def test_mixtral_reads_two_of_eight_experts_per_token_and_all_of_them_at_batch_256():
    mixtral = arch("mixtral-8x7b")
    embed = mixtral.vocab_size * mixtral.hidden_size
    assert roofline.step_weight_params(mixtral) == mixtral.num_active_params() - embed
    assert roofline.expected_experts_read(mixtral, 1) == pytest.approx(2)
    assert roofline.expected_experts_read(mixtral, 64) == pytest.approx(8, abs=1e-6)
    assert roofline.step_weight_params(mixtral, 256) == pytest.approx(mixtral.num_params() - embed, rel=1e-9)
    # the compute roofline is 2 x the parameters one token's matmuls read
    r = roofline.DeviceRates("test", 4e12, 8e14, "bfloat16", 8192, 1 << 30)
    assert roofline.compute_roofline_tokens_per_s(r, mixtral) == pytest.approx(8e14 / (2 * (12.88e9 - embed)), rel=1e-3)


def test_step_weight_bytes_of_a_loaded_moe_model_counts_the_routed_experts():
    from headrace.services.gpu_worker.loader.model_loader import load_model
    from headrace.common.models.source import resolve_model as locate

    model = load_model(locate("random:tiny-mixtral"), torch.device("cpu"), torch.float32).model
    a = model.arch
    experts = sum(p.numel() * 4 for p in model.parameters() if getattr(p, "expert_stack", False))
    everything = sum(p.numel() * 4 for p in model.parameters()) - a.vocab_size * a.hidden_size * 4
    assert roofline.step_weight_bytes(model) == pytest.approx(everything - experts + experts * 2 / 4, abs=1)
    assert roofline.step_weight_bytes(model, 1) == pytest.approx(roofline.step_weight_params(a) * 4, abs=4)
