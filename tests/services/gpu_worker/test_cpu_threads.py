"""--cpu-threads: the CPU worker runs its kernels on the threads it is given (default: every core it may use),
and the text-moving services keep to one thread of each pool."""

from __future__ import annotations

import os

import pytest
import torch

from headrace.common.config import ConfigError, EngineConfig, ModelConfig, ParallelConfig
from headrace.config_args import engine_config_from_args
from headrace.services.gpu_worker.model_runner import ModelRunner
from tests.configs import resolved


def runner_threads(cpu_threads: int | None) -> int:
    before = torch.get_num_threads()
    try:
        cfg = resolved(EngineConfig(model=ModelConfig(model="random:tiny-llama", max_model_len=128),
                                    parallel=ParallelConfig(cpu_threads=cpu_threads), device="cpu"))
        ModelRunner(cfg, log=lambda *_: None)
        return torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_worker_uses_the_threads_it_is_given_and_all_cores_by_default():
    assert runner_threads(1) == 1
    assert runner_threads(None) == len(os.sched_getaffinity(0))


def test_flag_and_validation():
    from headrace.cli import build_parser

    args = build_parser().parse_args(["serve", "--cpu-threads", "3"])
    assert engine_config_from_args(args).parallel.cpu_threads == 3
    with pytest.raises(ConfigError, match="--cpu-threads"):
        ParallelConfig(cpu_threads=0)
