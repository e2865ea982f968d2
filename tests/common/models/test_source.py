"""Model resolution: clear one-line errors for missing or unsupported models, never a download."""

from __future__ import annotations

import pytest

from headrace.common.models.source import ModelNotFoundError, resolve_model
from headrace.common.models.arch import UnsupportedModelError, arch_from_hf_config


def test_missing_path_names_what_was_looked_for(tmp_path):
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        resolve_model("meta-llama/Llama-3-8B", cache_root=str(tmp_path))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        resolve_model(str(tmp_path), cache_root=str(tmp_path))


def test_unknown_random_preset(tmp_path):
    with pytest.raises(ModelNotFoundError, match="llama-3-8b"):
        resolve_model("random:nope", cache_root=str(tmp_path))


def test_unsupported_architecture(tmp_path):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("gpt2")
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        arch_from_hf_config(cfg)


def test_random_presets_resolve():
    for name in ("llama-3-8b", "qwen3-8b", "tiny-llama"):
        src = resolve_model(f"random:{name}")
        arch = arch_from_hf_config(src.hf_config())
        assert arch.num_layers > 0
    arch = arch_from_hf_config(resolve_model("random:llama-3-8b").hf_config())
    assert 8.0e9 < arch.num_params() < 8.1e9  # Llama-3-8B has 8.03B parameters
