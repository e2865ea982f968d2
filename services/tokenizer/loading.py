"""Load the tokenizer and its chat template from the folder the model's resolution found."""

from __future__ import annotations

import os
from typing import Any

from headrace.common.config import ConfigError


def load_tokenizer(folder: str) -> Any:
    if not folder or not os.path.isdir(folder):
        raise ConfigError(f"no tokenizer folder at {folder!r}; pass --tokenizer")
    from transformers import AutoTokenizer  # heavy: imported only in the process that needs it

    return AutoTokenizer.from_pretrained(folder)


def chat_template_source(tokenizer: Any, override_path: str | None) -> str | None:
    """The operator's --chat-template file wins over the tokenizer's own template."""
    if override_path:
        with open(override_path, encoding="utf-8") as f:
            return f.read()
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # some tokenizers ship named templates
        template = template.get("default") or next(iter(template.values()), None)
    return template if isinstance(template, str) else None
