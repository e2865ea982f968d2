"""Per-layer windows and the Gemma flags, read from real-shape configs."""

from __future__ import annotations

import pytest

from headrace.common.models.arch import UnsupportedModelError, arch_from_hf_config
from headrace.common.models.source import ModelSource, load_hf_config


def arch_of(preset: str, **overrides):
    cfg = load_hf_config(ModelSource("random", preset, None, None, preset=preset))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return arch_from_hf_config(cfg)


def windows(arch) -> list[int | None]:
    return [arch.layer_window(i) for i in range(arch.num_layers)]


def test_gemma2_alternates_window_and_global_layers():
    arch = arch_of("gemma-2-9b")
    assert windows(arch)[:4] == [4096, None, 4096, None] and len(windows(arch)) == 42
    assert (arch.attn_logit_softcap, arch.final_logit_softcap, arch.attn_scale) == (50.0, 30.0, 256 ** -0.5)
    assert arch.norm_offset and arch.sandwich_norms and arch.scale_embeddings and not arch.qk_norm
    assert arch.mlp_activation == "gelu_tanh" and not arch.local_rope


def test_gemma3_has_five_windowed_layers_per_global_one():
    arch = arch_of("gemma-3-12b")
    assert windows(arch)[:12] == [1024] * 5 + [None] + [1024] * 5 + [None]
    assert arch.qk_norm and arch.local_rope and arch.attn_logit_softcap is None
    assert round(arch.num_params() / 1e9, 1) == 11.8


def test_the_no_window_benchmark_preset_keeps_everything_but_the_window():
    arch, windowed = arch_of("gemma-3-12b-no-window"), arch_of("gemma-3-12b")
    assert windows(arch) == [None] * 48
    assert all(arch.is_sliding_layer(i) == windowed.is_sliding_layer(i) for i in range(48))  # local RoPE kept


def test_mistral_v01_windows_every_layer_and_qwen2_only_when_asked():
    assert windows(arch_of("tiny-mistral-v0.1")) == [256, 256]
    assert windows(arch_of("tiny-qwen2")) == [None, None]
    assert windows(arch_of("tiny-llama")) == [None, None]


def test_an_unsupported_activation_or_model_type_names_what_is_supported():
    with pytest.raises(UnsupportedModelError, match="gelu_pytorch_tanh"):
        arch_of("tiny-gemma2", hidden_activation="relu")
    cfg = load_hf_config(ModelSource("random", "tiny-llama", None, None, preset="tiny-llama"))
    cfg.model_type = "gpt2"
    with pytest.raises(UnsupportedModelError, match="Gemma2ForCausalLM, Gemma3ForCausalLM"):
        arch_from_hf_config(cfg)
