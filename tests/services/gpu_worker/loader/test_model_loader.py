"""Random presets' weights: drawn with the configured std, the same for the same seed."""

from __future__ import annotations

import argparse

import pytest
import torch

from headrace.bench.gpu_check import check_init_std
from headrace.common.config import ConfigError, ModelConfig
from headrace.common.models.source import resolve_model
from headrace.config_args import add_engine_args, engine_config_from_args
from headrace.services.gpu_worker.loader.model_loader import load_model


def _weights(std: float, seed: int = 0) -> dict[str, torch.Tensor]:
    model = load_model(resolve_model("random:tiny-llama"), torch.device("cpu"), torch.float32, seed=seed, init_std=std).model
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_random_weights_follow_the_init_std_and_the_seed():
    small, default = _weights(0.005), _weights(0.02)
    matrices = [name for name, p in default.items() if p.dim() == 2]
    assert matrices
    for name in matrices:
        assert default[name].std().item() == pytest.approx(0.02, rel=0.1), name
        # One generator per tensor and seed: the same draw, scaled by the std.
        torch.testing.assert_close(small[name] * 4, default[name])
    norms = [p for name, p in default.items() if name.endswith("norm.weight")]
    assert norms and all(bool((p == 1).all()) for p in norms)
    assert not torch.equal(_weights(0.02, seed=1)[matrices[0]], default[matrices[0]])


def test_the_flag_sets_it_and_refuses_nonsense():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    config = engine_config_from_args(p.parse_args(["--model", "random:tiny-llama", "--random-init-std", "0.01"]))
    assert config.model.random_init_std == 0.01
    assert engine_config_from_args(p.parse_args([])).model.random_init_std == 0.02
    with pytest.raises(ConfigError, match="--random-init-std must be positive"):
        ModelConfig(random_init_std=0.0)


def test_logit_checks_draw_wide_models_smaller():
    assert check_init_std(576) == 0.02 and check_init_std(1024) == 0.02
    assert check_init_std(4096) == pytest.approx(0.01)
