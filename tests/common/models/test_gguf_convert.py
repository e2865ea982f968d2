"""The embedded GGUF converts into an HF folder whose weights equal transformers' own GGUF loading, and a
second start reuses the cache instead of converting again."""

from __future__ import annotations

import os
import time

import pytest
import torch
from safetensors import safe_open

from headrace.common.models import gguf_convert
from headrace.common.models.source import EMBEDDED_GGUF, embedded_gguf_path, resolve_model


@pytest.fixture(scope="module")
def hf_from_gguf():
    from transformers import AutoModelForCausalLM

    path = embedded_gguf_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=EMBEDDED_GGUF, dtype=torch.float32)


def test_dequantized_weights_equal_transformers_gguf_loader(embedded_source, hf_from_gguf):
    ref = hf_from_gguf.state_dict()
    with safe_open(os.path.join(embedded_source.weights_dir, "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert len(names) == 272
        for name in names:  # Q/K exercise the un-permutation; ffn/embeddings the Q4_1 / Q8_0 dequantization
            torch.testing.assert_close(f.get_tensor(name), ref[name].float(), atol=0, rtol=0, msg=name)


def test_config_and_tokenizer_files(embedded_source):
    cfg = embedded_source.hf_config()
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        ("llama", 30, 9, 3)
    assert cfg.tie_word_embeddings
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json", "DONE"):
        assert os.path.exists(os.path.join(embedded_source.tokenizer_dir, f)), f


def test_second_start_uses_the_cache(embedded_source, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_convert, "_convert_into", boom)
    t0 = time.perf_counter()
    again = resolve_model("")
    assert again.weights_dir == embedded_source.weights_dir
    assert time.perf_counter() - t0 < 2.0


def test_fresh_conversion_into_a_new_cache(tmp_path):
    src = resolve_model("", cache_root=str(tmp_path))
    assert src.weights_dir.startswith(str(tmp_path))
    assert os.path.exists(os.path.join(src.weights_dir, "DONE"))


def test_kept_quantized_folder_holds_the_integers_and_names_them(embedded_source):
    """The CPU default: quantized linears as codes/scales/mins listed in a gguf quantization_config, the tied
    head stored on its own, the embedding table dequantized exactly as in the float folder."""
    from headrace.common.models.quant import quant_spec

    kept = resolve_model("", keep_quantized=True)
    assert kept.weights_dir.endswith(gguf_convert.QUANT_SUFFIX) and kept.weights_dir != embedded_source.weights_dir
    cfg = kept.hf_config()
    spec = quant_spec(cfg, None)
    assert spec.kind == "gguf" and len(spec.modules) == 30 * 7 + 1 and "lm_head" in spec.modules
    assert not cfg.tie_word_embeddings
    with safe_open(os.path.join(kept.weights_dir, "model.safetensors"), "pt") as f, \
            safe_open(os.path.join(embedded_source.weights_dir, "model.safetensors"), "pt") as dense:
        q = "model.layers.0.self_attn.q_proj"
        assert f.get_tensor(q + ".codes").dtype == torch.uint8 and f.get_tensor(q + ".codes").shape == (576, 576)
        assert f.get_tensor("lm_head.scales").shape == (49152, 576 // 16)
        w = f.get_tensor(q + ".codes").float() * f.get_tensor(q + ".scales").repeat_interleave(16, 1) \
            + f.get_tensor(q + ".mins").repeat_interleave(16, 1)
        assert torch.equal(w, dense.get_tensor(q + ".weight"))  # the Q/K un-permutation applies to all three
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), dense.get_tensor("model.embed_tokens.weight"))
