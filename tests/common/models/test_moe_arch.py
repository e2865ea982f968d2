"""What ModelArch reads from MoE configs: which layers are MoE, the routing flags, and the parameters a token
actually reads (what the benchmarks' rooflines count)."""

from __future__ import annotations

import pytest

from headrace.common.config import ConfigError, EngineConfig
from headrace.common.models.arch import UnsupportedModelError, arch_from_hf_config
from headrace.common.models.resolve import resolve_engine_config
from headrace.common.models.source import resolve_model


def arch(preset: str):
    return arch_from_hf_config(resolve_model(f"random:{preset}").hf_config())


def test_published_total_and_active_parameter_counts():
    mixtral, qwen3 = arch("mixtral-8x7b"), arch("qwen3-30b-a3b")
    assert round(mixtral.num_params() / 1e9, 1) == 46.7 and round(mixtral.num_active_params() / 1e9, 1) == 12.9
    assert round(qwen3.num_params() / 1e9, 1) == 30.5 and round(qwen3.num_active_params() / 1e9, 1) == 3.4
    dense = arch("llama-3-8b")
    assert dense.num_active_params() == dense.num_params()


def test_routing_flags_per_family():
    mixtral, qwen2, qwen3 = arch("tiny-mixtral"), arch("tiny-qwen2-moe"), arch("tiny-qwen3-moe")
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.moe_intermediate_size) == (4, 2, 96)
    assert mixtral.norm_topk_prob and not qwen2.norm_topk_prob and qwen3.norm_topk_prob
    assert qwen2.shared_expert_intermediate_size == 96 and qwen2.qkv_bias and not qwen2.qk_norm
    assert qwen3.qk_norm and not qwen3.shared_expert_intermediate_size
    assert [qwen2.is_moe_layer(n) for n in range(3)] == [True, False, True]  # mlp_only_layers [1]
    assert not arch("tiny-llama").is_moe_layer(0)


def test_decoder_sparse_step_makes_every_other_layer_moe():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("qwen2_moe", num_hidden_layers=4, decoder_sparse_step=2)
    assert [arch_from_hf_config(cfg).is_moe_layer(n) for n in range(4)] == [False, True, False, True]


def test_unsupported_architecture_lists_the_moe_families():
    from transformers import AutoConfig

    with pytest.raises(UnsupportedModelError, match="MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM"):
        arch_from_hf_config(AutoConfig.for_model("dbrx"))


def test_quantizing_an_moe_model_is_refused_at_start_up():
    with pytest.raises(ConfigError, match="quantized mixture-of-experts"):
        resolve_engine_config(EngineConfig.from_flat(model="random:tiny-mixtral", quantization="fp8", device="cpu"),
                              log=lambda *_: None)


def test_tensor_parallel_size_must_split_the_experts():
    from headrace.common.models.arch import check_tp_experts

    check_tp_experts(arch("tiny-qwen2-moe"), 4)  # 32 and 96 split 4 ways
    with pytest.raises(ValueError, match="must divide the model's experts' intermediate size 96"):
        check_tp_experts(arch("tiny-mixtral"), 64)
    check_tp_experts(arch("tiny-llama"), 7)  # no experts: nothing to split
