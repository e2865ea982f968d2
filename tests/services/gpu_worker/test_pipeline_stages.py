"""Pipeline stages in one process: each stage's runner holds only its layers, the hidden states pass through
an in-process stand-in for torch.distributed's send/recv (the real transfer is tested through the server,
tests/headrace/test_serve_pipeline.py), and the scheduler keeps P disjoint steps in flight. Greedy tokens
must equal one stage's, token for token."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from headrace.common.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from headrace.common.pipeline_layout import stage_layer_ranges
from headrace.common.sampling_params import SamplingParams
from headrace.services.gpu_worker.model_runner import ModelRunner
from headrace.services.gpu_worker.pipeline import PipelineStage, StageLayers
from headrace.services.scheduler.request import Request
from headrace.services.scheduler.scheduler import Scheduler
from tests.configs import resolved

PROMPTS = [[5, 9, 2, 7, 1, 3], [11, 4], [8, 8, 8, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17], [3, 1]]


class LoopbackStage(PipelineStage):
    """A stage whose transfers go through in-process queues, one per link (stage s -> s + 1)."""

    links: dict[int, deque] = {}

    def send(self, hidden_and_residual: torch.Tensor) -> None:
        self.links.setdefault(self.rank, deque()).append(hidden_and_residual.clone())

    def recv(self, num_tokens: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        got = self.links[self.rank - 1].popleft()
        assert got.shape == (2, num_tokens, hidden_size) and got.dtype == dtype
        return got


def stage_runners(model: str, pp: int) -> list[ModelRunner]:
    cfg = resolved(EngineConfig(model=ModelConfig(model=model, seed=5, max_model_len=256),
                                cache=CacheConfig(num_blocks=64), scheduler=SchedulerConfig(max_num_batched_tokens=16)))
    if pp == 1:
        return [ModelRunner(cfg, log=lambda *_: None)]
    ranges = stage_layer_ranges(_num_layers(cfg), pp)
    return [ModelRunner(cfg, log=lambda *_: None,
                        stage=LoopbackStage(s, pp, StageLayers(*ranges[s]), None if s == 0 else s - 1,
                                            None if s == pp - 1 else s + 1))
            for s in range(pp)]


def _num_layers(cfg: EngineConfig) -> int:
    from headrace.common.models.arch import arch_from_hf_config
    from headrace.common.models.source import load_hf_config

    return arch_from_hf_config(load_hf_config(cfg.require_resolved())).num_layers


def generate(runners: list[ModelRunner], max_tokens: int) -> dict[str, list[int]]:
    """Every prompt's greedy tokens, with len(runners) steps in flight (disjoint when more than one)."""
    depth = len(runners)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16), CacheConfig(), 64, 256, disjoint_steps=depth > 1)
    for i, prompt in enumerate(PROMPTS):
        sched.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                  ignore_eos=True), 0, (2,)))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(PROMPTS))}
    in_flight: deque = deque()
    while sched.has_unfinished_requests() or in_flight:
        if sched.has_unfinished_requests() and len(in_flight) < depth:
            plan = sched.schedule()
            if not plan.is_empty:
                for runner in runners:  # stage by stage; each later one receives what the one before sent
                    result = runner.execute(plan)
                in_flight.append((plan, result))
                continue
        plan, result = in_flight.popleft()
        for out in sched.update_from_output(plan, result):
            tokens[out.req_id] += out.new_token_ids
    return tokens


@pytest.mark.parametrize("model, pp", [("random:tiny-llama", 2), ("random:tiny-gemma3", 3)])
def test_pipeline_stages_give_the_tokens_of_one_stage(model, pp):
    runners = stage_runners(model, pp)
    assert [len(r.model.layers) for r in runners] == [1] * pp  # two and three layers, one per stage
    assert runners[0].model.lm_head is None and runners[-1].model.lm_head is not None
    assert all(len(r.kv_caches) == 1 for r in runners)  # KV for its own layer only
    assert generate(runners, 8) == generate(stage_runners(model, 1), 8)
