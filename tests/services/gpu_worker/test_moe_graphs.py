"""The MoE block under decode CUDA graphs and piecewise graphs (GPU): the fused kernel's alignment buffers are
sized for the worst case, so captured steps give the eager runner's greedy tokens. On CPU: the padded static
forward a decode graph captures equals the eager forward for an MoE model too."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from headrace.common.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from headrace.common.sampling_params import SamplingParams  # noqa: E402
from headrace.services.gpu_worker.cuda_graphs import capture_sizes  # noqa: E402
from headrace.services.gpu_worker.model import moe  # noqa: E402
from headrace.services.gpu_worker.model.llama import ForwardContext  # noqa: E402
from headrace.services.gpu_worker.model_runner import ModelRunner  # noqa: E402
from tests.configs import resolved  # noqa: E402
from tests.services.gpu_worker.plan_driver import PlanDriver  # noqa: E402
from tests.services.gpu_worker.test_cuda_graphs import make_graphs, prefill_then_decode_batch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def moe_runner(enforce_eager: bool) -> ModelRunner:
    pytest.importorskip("triton")
    cfg = EngineConfig(model=ModelConfig(model="random:tiny-qwen2-moe", dtype="float32", max_model_len=128, seed=5),
                       cache=CacheConfig(num_blocks=64, block_size=8), scheduler=SchedulerConfig(max_num_seqs=8),
                       attention_backend="triton", device="cuda" if HAS_CUDA else "cpu", enforce_eager=enforce_eager)
    return ModelRunner(resolved(cfg), log=lambda *_: None)


def test_padded_static_decode_forward_with_the_fused_kernel_equals_eager(monkeypatch):
    """Three decodes staged into the 4-row static batch (the forward a graph captures), the experts run by the
    fused kernel (the interpreter on CPU): the real rows equal the eager forward of the torch reference."""
    runner = moe_runner(enforce_eager=True)
    batch = prefill_then_decode_batch(runner, [5, 13, 9])
    ctx = ForwardContext(batch.attn, runner.kv_caches, runner.backend, runner.cos_sin_cache)
    eager = runner.model(batch.input_ids, batch.positions, ctx).clone()
    graphs = make_graphs(runner, capture_sizes(8))
    graphs.input_ids.fill_(7)  # a stale id in the padded row: routed like any token, then dropped
    monkeypatch.setattr(moe, "use_fused_kernel", lambda x: True)
    bs = graphs.stage(batch)
    assert bs == 4
    hidden = graphs.forward_static(bs)
    torch.testing.assert_close(hidden[:3], eager, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(hidden).all()


def test_runner_steps_through_pieces_with_the_fused_kernel_give_the_eager_tokens(monkeypatch):
    """Chunked prefills beside decodes through piecewise pieces (run uncaptured), the experts by the fused
    kernel: the greedy tokens equal the eager runner's with the torch reference."""
    from tests.services.gpu_worker.test_piecewise_graphs import make_pieces

    eager, pieced = moe_runner(enforce_eager=True), moe_runner(enforce_eager=True)
    pieced.piecewise_graphs = make_pieces(pieced, [8, 16, 32])
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (4, 13)]
    params = SamplingParams(temperature=0.0)
    want = PlanDriver(eager, chunk_size=7).generate(prompts, params, 3)
    monkeypatch.setattr(moe, "use_fused_kernel", lambda x: True)
    assert PlanDriver(pieced, chunk_size=7).generate(prompts, params, 3) == want
    assert pieced.piecewise_graphs.num_replays >= 2


def test_warm_up_runs_every_fused_kernel_variant_a_step_can_launch():
    """(On a GPU the runner calls this before capturing graphs, so no variant compiles while serving.)"""
    runner = moe_runner(enforce_eager=True)
    assert runner.model.warm_up_experts(40) == 2  # 8 experts, top 3: BLOCK_M 16 up to 28 tokens, then 32


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_graphed_moe_steps_give_the_eager_tokens():
    graphed, eager = moe_runner(enforce_eager=False), moe_runner(enforce_eager=True)
    assert graphed.decode_graphs is not None and graphed.piecewise_graphs is not None
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (4, 17, 9, 30, 2, 11)]
    params = SamplingParams(temperature=0.0)
    decode0, pieces0 = graphed.decode_graphs.num_replays, graphed.piecewise_graphs.num_replays
    for chunk in (None, 7):
        want = PlanDriver(eager, chunk_size=chunk).generate(prompts, params, 6)
        assert PlanDriver(graphed, chunk_size=chunk).generate(prompts, params, 6) == want
    assert graphed.decode_graphs.num_replays > decode0 + 5 and graphed.piecewise_graphs.num_replays > pieces0 + 2
