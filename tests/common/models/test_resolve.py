"""Resolving a config's model once: the name it is served under, its context limit, its EOS ids, and the
device's default token budget, all shipped inside the config."""

from __future__ import annotations

import json

import pytest

from headrace.common.config import (
    ConfigError,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from headrace.common.models.resolve import resolve_engine_config


def resolve(**flat) -> EngineConfig:
    return resolve_engine_config(EngineConfig.from_flat(**{"device": "cpu", **flat}), log=lambda *_: None)


def hf_folder(tmp_path, **config) -> str:
    """A folder resolve_model accepts: a tiny Llama config.json, a generation_config.json, a weights file."""
    from transformers import AutoConfig

    AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                         max_position_embeddings=2048, eos_token_id=2, **config).save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    return str(tmp_path)


def test_served_model_name():
    assert resolve().resolved.name == "SmolLM2-135M-Instruct"
    assert resolve(model="random:tiny-llama").resolved.name == "random:tiny-llama"
    assert resolve(model="random:tiny-llama", served_model_name="llama").resolved.name == "llama"


def test_a_folder_resolves_its_name_limit_and_eos_ids_from_config_and_generation_config(tmp_path):
    folder = hf_folder(tmp_path)
    resolved = resolve(model=folder).resolved
    assert resolved.name == folder and resolved.weights_dir == folder and resolved.tokenizer_dir == folder
    assert resolved.max_model_len == 2048 and resolved.vocab_size == 512
    assert resolved.eos_token_ids == (2, 7) and json.dumps(resolved.eos_token_ids)


def test_max_model_len_defaults_to_the_model_and_may_only_shrink_it():
    assert resolve(model="random:tiny-llama").resolved.max_model_len == 1024
    assert resolve(model="random:tiny-llama", max_model_len=100).resolved.max_model_len == 100
    with pytest.raises(ConfigError, match="exceeds the model's context length 1024"):
        resolve(model="random:tiny-llama", max_model_len=2000)


def test_a_sliding_window_model_is_served_past_its_window():
    """The kernels honour the window, so the context is the model's whole position range, not the window."""
    assert resolve(model="random:tiny-mistral-v0.1").resolved.max_model_len == 1024
    assert resolve(model="random:tiny-mistral-v0.1", max_model_len=512).resolved.max_model_len == 512
    with pytest.raises(ConfigError, match="context length 1024"):
        resolve(model="random:tiny-mistral-v0.1", max_model_len=2000)


def test_tensor_parallel_size_must_split_the_heads():
    cfg = EngineConfig(model=ModelConfig(model="random:tiny-llama"), parallel=ParallelConfig(tensor_parallel_size=3),
                       device="cpu")
    with pytest.raises(ValueError, match="4 attention heads"):
        resolve_engine_config(cfg, log=lambda *_: None)


def test_the_token_budget_defaults_by_device_and_an_explicit_one_is_kept():
    assert resolve(model="random:tiny-llama").scheduler.max_num_batched_tokens == 2048
    assert resolve(model="random:tiny-llama", max_num_batched_tokens=64).scheduler.max_num_batched_tokens == 64
    with pytest.raises(ConfigError, match="resolve"):
        SchedulerConfig().token_budget  # noqa: B018 - an unresolved budget is an error, not a silent default


def test_resolution_happens_once_and_survives_the_trip_to_every_process():
    config = resolve(model="random:tiny-llama")
    assert resolve_engine_config(config) is not config and resolve_engine_config(config) == config
    again = EngineConfig.from_dict(config.to_dict())
    assert again == config and again.require_resolved().eos_token_ids == (2,)
    with pytest.raises(ConfigError, match="not resolved"):
        EngineConfig().require_resolved()


def test_the_embedded_gguf_on_cpu_is_kept_quantized_by_default_and_float32_on_request():
    from headrace.common.models.resolve import default_dtype, keeps_gguf_quantized

    quiet = lambda *_: None  # noqa: E731
    cfg = resolve_engine_config(EngineConfig(device="cpu"), log=quiet)  # --dtype auto
    assert cfg.model.dtype == "bfloat16" and cfg.require_resolved().quantization.kind == "gguf"
    assert keeps_gguf_quantized(cfg)
    cfg = resolve_engine_config(EngineConfig(model=ModelConfig(dtype="float32"), device="cpu"), log=quiet)
    assert cfg.model.dtype == "float32" and cfg.require_resolved().quantization is None
    # Not a GGUF, a GPU, or an explicit --quantization: auto keeps its usual meaning.
    assert default_dtype(EngineConfig(model=ModelConfig(model="random:tiny-llama"), device="cpu")) == "auto"
    assert default_dtype(EngineConfig(device="cuda")) == "auto"
    assert not keeps_gguf_quantized(EngineConfig(model=ModelConfig(dtype="bfloat16"), device="cuda"))


def draft(draft_model: str, **flat) -> EngineConfig:
    return resolve(speculative=SpeculativeConfig(method="draft_model", model=draft_model), **flat)


def test_a_draft_model_resolves_before_any_process_starts_and_must_share_the_vocabulary(tmp_path):
    cfg = draft("random:tiny-mistral", model="random:tiny-llama", max_model_len=256)
    assert cfg.resolved_draft.preset == "tiny-mistral" and cfg.resolved_draft.max_model_len == 256
    assert EngineConfig.from_dict(cfg.to_dict()).resolved_draft == cfg.resolved_draft  # shipped to the worker
    # The embedded model (49,152 tokens) cannot draft for a 512-token vocabulary, nor a random 128k one for it.
    with pytest.raises(ConfigError, match="vocabulary of 49152 tokens, the target 512"):
        draft("embedded", model="random:tiny-llama")
    with pytest.raises(ConfigError, match="share the target's tokenizer"):
        draft("random:llama-3-8b")
    with pytest.raises(ConfigError, match="fewer than --max-model-len"):
        draft("random:tiny-llama", model=hf_folder(tmp_path))  # 1,024 positions drafting for 2,048
    with pytest.raises(ConfigError, match="not supported with --tensor-parallel-size > 1"):
        EngineConfig(parallel=ParallelConfig(tensor_parallel_size=2),
                     speculative=SpeculativeConfig(method="draft_model", model="embedded"))
