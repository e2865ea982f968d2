"""Find and load the tokenizer, its chat template and its end-of-sequence ids from the model config."""

from __future__ import annotations

import json
import os
from typing import Any

from headrace.common.config import ConfigError, ModelConfig

def tokenizer_folder(model: ModelConfig) -> str:
    """The folder holding the tokenizer files. The launcher passes the one the model resolver produced as
    --tokenizer; otherwise resolve the model the same way the worker does (a GGUF is converted once into
    the shared cache, under a lock)."""
    if model.tokenizer:
        if not os.path.isdir(model.tokenizer):
            raise ConfigError(f"no tokenizer folder at {model.tokenizer!r}")
        return model.tokenizer
    from headrace.services.gpu_worker.loader.source import resolve_model

    return resolve_model(model.model).tokenizer_dir


def load_tokenizer(model: ModelConfig) -> Any:
    from transformers import AutoTokenizer  # heavy: imported only in the process that needs it

    return AutoTokenizer.from_pretrained(tokenizer_folder(model))


def chat_template_source(tokenizer: Any, override_path: str | None) -> str | None:
    """The operator's --chat-template file wins over the tokenizer's own template."""
    if override_path:
        with open(override_path, encoding="utf-8") as f:
            return f.read()
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # some tokenizers ship named templates
        template = template.get("default") or next(iter(template.values()), None)
    return template if isinstance(template, str) else None


def eos_token_ids(tokenizer: Any, folder: str | None) -> list[int]:
    """The tokenizer's EOS plus generation_config.json's (Llama 3 and others stop on several ids)."""
    ids = set()
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    path = os.path.join(folder, "generation_config.json") if folder else ""
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        ids.update(e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int))
    return sorted(ids)
