"""The embedded SmolLM2 tokenizer (byte-level BPE), converted from its GGUF once per test session."""

from __future__ import annotations

import pytest

from services.tokenizer.loading import embedded_gguf


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    folder, gguf_file = embedded_gguf()
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(out)  # the ~4 s conversion
    return str(out)


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def raw_tokenizer(hf_tokenizer):
    return hf_tokenizer.backend_tokenizer
