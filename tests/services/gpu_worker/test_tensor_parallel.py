"""Tensor parallelism on CPU (gloo): sharded ranks give exactly the greedy tokens of TP=1."""

from __future__ import annotations

import multiprocessing as mp
import socket

import pytest

from headrace.common.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig
from headrace.common.sampling_params import SamplingParams
from tests.configs import resolved

PROMPTS = [[1, 5, 9, 200, 31, 77, 4, 18, 9, 301, 42], [7, 7, 8, 100, 13], list(range(40, 75))]
NEW_TOKENS = 12


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(config_dict, rank, queue):
    import torch

    torch.set_num_threads(1)
    from headrace.services.gpu_worker.model_runner import ModelRunner
    from headrace.services.gpu_worker.worker import init_tensor_parallel
    from tests.services.gpu_worker.plan_driver import PlanDriver

    config = EngineConfig.from_dict(config_dict)
    tp = init_tensor_parallel(config, rank, torch.device("cpu"))
    runner = ModelRunner(resolved(config), tp=tp, device="cpu", log=lambda *_: None)
    # Prompt logprobs too: every rank gathers the prompt rows' logits (a collective) as it does the sampled ones.
    driver = PlanDriver(runner)
    out = driver.generate(PROMPTS, SamplingParams(temperature=0.0, prompt_logprobs=1), NEW_TOKENS)
    scores = [driver.prompt_logprobs[rid].token_logprobs for rid in sorted(driver.prompt_logprobs)]
    queue.put((rank, out, runner.kv_layout.num_kv_heads, scores))


def run_tp(model: str, tp_size: int) -> list:
    config = EngineConfig(model=ModelConfig(model=model, dtype="float32", max_model_len=512), cache=CacheConfig(num_blocks=64),
                          parallel=ParallelConfig(tensor_parallel_size=tp_size, dist_init_addr=f"127.0.0.1:{_port()}"),
                          device="cpu")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(config.to_dict(), r, queue)) for r in range(tp_size)]
    for p in procs:
        p.start()
    results = dict((rank, (out, heads, scores)) for rank, out, heads, scores in (queue.get(timeout=600)
                                                                                for _ in procs))
    for p in procs:
        p.join(60)
    assert all(results[r][0] == results[0][0] for r in results), "ranks disagree"
    return results


@pytest.mark.parametrize("model,tp_size", [("random:tiny-llama", 2), ("", 3)])
def test_tp_matches_single_rank(model, tp_size):
    single, single_scores = run_tp(model, 1)[0][0::2]
    sharded = run_tp(model, tp_size)
    assert sharded[0][0] == single
    assert all(len(o) == NEW_TOKENS for o in single)
    assert [len(s) for s in single_scores] == [len(p) - 1 for p in PROMPTS]
    for ours, theirs in zip(sharded[0][2], single_scores):
        assert ours == pytest.approx(theirs, abs=1e-4)


def test_tp2_on_embedded_model_fails_naming_head_counts():
    from headrace.common.models.arch import check_tp_heads

    with pytest.raises(ValueError, match="9 attention heads"):
        check_tp_heads(9, 3, 2)
