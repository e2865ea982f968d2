"""Launcher start-up checks: every process agrees on one resolved config, and impossible setups fail first."""

from __future__ import annotations

import pytest

from headrace.common.config import EngineConfig, ModelConfig, ParallelConfig
from headrace.launcher import check_devices, prepare_config


def test_prepare_config_resolves_model_tokenizer_and_addresses():
    config = prepare_config(EngineConfig(device="cpu"), log_fn=lambda *_: None)
    assert config.resolved.tokenizer_dir and config.resolved.name == "SmolLM2-135M-Instruct"
    assert config.resolved.max_model_len == 8192
    assert config.server.ipc_dir


def test_more_ranks_than_gpus_fails_before_start(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="needs 2 GPUs; this host has 1"):
        check_devices("cuda", 2)
    check_devices("cpu", 4)  # CPU ranks are processes: any number


def test_tp_that_does_not_divide_heads_fails_before_start():
    cfg = EngineConfig(model=ModelConfig(model="random:tiny-llama"), parallel=ParallelConfig(tensor_parallel_size=3),
                       device="cpu")
    with pytest.raises(ValueError, match="4 attention heads"):
        prepare_config(cfg, log_fn=lambda *_: None)


def test_bad_flags_are_one_line_errors(capsys):
    from headrace.cli import main

    assert main(["serve", "--port", "0"]) == 2
    assert main(["serve", "--block-size", "7"]) == 2
    err = capsys.readouterr().err
    assert "headrace: error: --port must be in 1..65535" in err and "Traceback" not in err
    assert "--block-size must be one of" in err
