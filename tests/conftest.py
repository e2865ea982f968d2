"""Shared fixtures: the embedded model converted once per session, and the HF oracle on the same weights."""

from __future__ import annotations

import os

import pytest

# Tests never reach a hub; the converted embedded model is cached across runs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def embedded_source():
    from headrace.common.models.source import resolve_model

    return resolve_model("")


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_source.tokenizer_dir)


@pytest.fixture(scope="session")
def embedded_hf_model(embedded_source):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_source.weights_dir, dtype=torch.float32)
    return model.eval()
