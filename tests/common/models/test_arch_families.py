"""What a config says about its family: Falcon's layouts, Phi-3's LongRoPE, and clear refusals at start-up
(an unsupported architecture named with the supported ones listed, ALiBi Falcon named by its flag)."""

from __future__ import annotations

import json

import pytest

from headrace.common.config import EngineConfig, ModelConfig
from headrace.common.models.arch import SUPPORTED_ARCHITECTURES, UnsupportedModelError, arch_from_hf_config
from headrace.common.models.source import resolve_model
from headrace.launcher import prepare_config


def preset_arch(name: str):
    return arch_from_hf_config(resolve_model(f"random:{name}").hf_config())


def test_falcon_layouts_become_flags():
    old, new = preset_arch("tiny-falcon"), preset_arch("tiny-falcon-new-arch")
    seq = preset_arch("tiny-falcon-sequential")
    assert (old.num_kv_heads, old.parallel_residual, old.separate_mlp_norm, old.norm) == (1, True, False, "layer")
    assert (new.num_kv_heads, new.parallel_residual, new.separate_mlp_norm) == (2, True, True)
    assert (seq.num_kv_heads, seq.parallel_residual) == (4, False)
    assert not old.gated_mlp and old.mlp_activation == "gelu" and old.attn_out_bias and old.mlp_bias


def test_real_shapes_have_their_published_sizes():
    assert 6.9e9 < preset_arch("falcon-7b").num_params() < 7.0e9  # Falcon-7B: 6.92B
    assert 41.0e9 < preset_arch("falcon-40b").num_params() < 42.0e9  # Falcon-40B: 41.3B
    assert 3.8e9 < preset_arch("phi-3-mini").num_params() < 3.9e9  # Phi-3-mini: 3.82B


def test_phi3_long_rope_switch_point():
    assert preset_arch("tiny-phi3-longrope").longrope_original_max == 32
    assert preset_arch("phi-3-mini").longrope_original_max is None
    assert preset_arch("phi-3-mini-longrope").longrope_original_max == 256


def test_old_phi3_su_configs_read_as_longrope():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("phi3", hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                               original_max_position_embeddings=64,
                               rope_scaling={"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})
    assert arch_from_hf_config(cfg).longrope_original_max == 64


def test_alibi_falcon_is_refused_naming_the_flag():
    from transformers import AutoConfig

    with pytest.raises(UnsupportedModelError, match='"alibi": true'):
        arch_from_hf_config(AutoConfig.for_model("falcon", alibi=True, hidden_size=64, num_attention_heads=4))


def test_partial_rotary_is_refused():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("phi3", hidden_size=64, num_attention_heads=4, partial_rotary_factor=0.5)
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor 0.5"):
        arch_from_hf_config(cfg)


def test_start_up_on_an_unsupported_architecture_names_it_and_lists_the_supported(tmp_path, capsys):
    from headrace.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModelError) as e:
        prepare_config(EngineConfig(model=ModelConfig(model=str(tmp_path)), device="cpu"), log_fn=lambda *_: None)
    assert "GPT2LMHeadModel" in str(e.value) and all(a in str(e.value) for a in SUPPORTED_ARCHITECTURES)
    assert main(["serve", "--model", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "headrace: error: model architecture GPT2LMHeadModel" in err and "FalconForCausalLM" in err
    assert "Traceback" not in err


def test_quantized_phi3_checkpoints_are_refused_at_start_up(tmp_path):
    from headrace.common.config import ConfigError
    from headrace.common.models.presets import PRESETS
    from headrace.common.models.resolve import resolve_engine_config

    config = {**PRESETS["tiny-phi3-longrope"], "quantization_config": {"quant_method": "gptq", "bits": 4,
                                                                      "group_size": 32, "sym": True}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="quantized phi3 checkpoints are not supported"):
        resolve_engine_config(EngineConfig(model=ModelConfig(model=str(tmp_path)), device="cpu"), log=lambda *_: None)
    fp8 = EngineConfig(model=ModelConfig(model="random:tiny-falcon", quantization="fp8"), device="cpu")
    assert resolve_engine_config(fp8, log=lambda *_: None).resolved.quantization.checkpoint_format == "online"
