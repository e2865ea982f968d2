"""The embedded SmolLM2 tokenizer (byte-level BPE), from the converted model cache."""

from __future__ import annotations

import pytest



@pytest.fixture(scope="session")
def tokenizer_dir(embedded_source):
    return embedded_source.tokenizer_dir  # the converted, cached embedded model (tests/conftest.py)


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def raw_tokenizer(hf_tokenizer):
    return hf_tokenizer.backend_tokenizer
