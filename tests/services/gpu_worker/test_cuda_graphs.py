"""Decode CUDA graphs: the batch-size ladder, padding of a step into the static buffers (checked on CPU by
running the very forward a graph captures, Triton in its interpreter), and on a GPU, replay vs eager."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from headrace.common.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from headrace.common.messages import CachedRequestData, NewRequestData, StepPlan  # noqa: E402
from headrace.common.sampling_params import SamplingParams  # noqa: E402
from headrace.services.gpu_worker.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from headrace.services.gpu_worker.batch_inputs import prepare_batch  # noqa: E402
from headrace.services.gpu_worker.cuda_graphs import DecodeGraphs, capture_sizes, padded_size  # noqa: E402
from headrace.services.gpu_worker.graph_runner import disabled_reason  # noqa: E402
from headrace.services.gpu_worker.model.llama import ForwardContext  # noqa: E402
from headrace.services.gpu_worker.model_runner import ModelRunner  # noqa: E402
from tests.services.gpu_worker.plan_driver import PlanDriver  # noqa: E402
from tests.configs import resolved

HAS_CUDA = torch.cuda.is_available()


def test_ladder():
    assert capture_sizes(256) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(1) == [1]
    assert capture_sizes(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100]
    assert capture_sizes(4096)[-3:] == [384, 448, 512]  # capped: larger decode batches run eagerly


@pytest.mark.parametrize("n,expected", [(1, 1), (3, 4), (4, 4), (9, 16), (17, 24), (65, 96), (100, 100), (101, None)])
def test_padded_size(n, expected):
    assert padded_size(capture_sizes(100), n) == expected


def test_disabled_reasons():
    pytest.importorskip("triton")
    from headrace.services.gpu_worker.attention.triton_backend import TritonAttentionBackend

    cuda, cpu, triton = torch.device("cuda", 0), torch.device("cpu"), TritonAttentionBackend()
    on = EngineConfig()
    assert disabled_reason(on, cuda, triton, 1) is None
    assert disabled_reason(EngineConfig(enforce_eager=True), cuda, triton, 1) == "--enforce-eager"
    assert disabled_reason(on, cpu, triton, 1) == "device cpu"
    assert "torch" in disabled_reason(on, cuda, TorchAttentionBackend(block_size=16), 1)
    assert disabled_reason(on, cuda, triton, 2) is None  # NCCL all-reduces are captured with the layers


def make_runner(enforce_eager: bool, max_num_seqs: int = 8, model: str = "tiny-llama") -> ModelRunner:
    pytest.importorskip("triton")
    # float32: graph and eager runs may pick different GEMM algorithms (padded M), and bf16 rounding of
    # that could flip a near-tie greedy token of a random model.
    cfg = EngineConfig(model=ModelConfig(model=f"random:{model}", dtype="float32", max_model_len=128, seed=5),
                       cache=CacheConfig(num_blocks=64, block_size=8),
                       scheduler=SchedulerConfig(max_num_seqs=max_num_seqs), attention_backend="triton",
                       device="cuda" if HAS_CUDA else "cpu", enforce_eager=enforce_eager)
    return ModelRunner(resolved(cfg), log=lambda *_: None)


def add_requests(runner: ModelRunner, prompt_lens: list[int]) -> StepPlan:
    """Register one request per prompt length (blocks leave room for decode tokens); returns the prefill plan."""
    g = torch.Generator().manual_seed(1)
    plan = StepPlan(step_id=0)
    next_block = 0
    for i, n in enumerate(prompt_lens):
        blocks = list(range(next_block, next_block + n // runner.block_size + 2))
        next_block += len(blocks)
        prompt = torch.randint(3, 512, (n,), generator=g).tolist()
        plan.new_requests.append(NewRequestData(f"r{i}", prompt, [], SamplingParams(temperature=0.0), blocks, 0, 0))
        plan.num_scheduled_tokens[f"r{i}"] = n
    return plan


def prefill_then_decode_batch(runner: ModelRunner, prompt_lens: list[int]):
    """Run the prompts' prefill step, then prepare (not run) the decode step that follows."""
    runner.execute(add_requests(runner, prompt_lens))
    decode = StepPlan(step_id=1, cached_requests=[CachedRequestData(f"r{i}", [], n) for i, n in enumerate(prompt_lens)],
                      num_scheduled_tokens={f"r{i}": 1 for i in range(len(prompt_lens))})
    runner._apply_plan(decode)
    return prepare_batch(runner.requests, decode.num_scheduled_tokens, runner.block_size, runner.device)


def make_graphs(runner: ModelRunner, sizes: list[int]) -> DecodeGraphs:
    return DecodeGraphs(runner.model, runner.backend, runner.kv_caches, runner.cos_sin_cache, sizes,
                        -(-runner.max_model_len // runner.block_size), runner.block_size)


def test_accepts_only_decode_steps_that_fit():
    runner = make_runner(enforce_eager=True)
    plan = add_requests(runner, [5, 13, 9])
    runner._apply_plan(plan)
    prefill = prepare_batch(runner.requests, plan.num_scheduled_tokens, runner.block_size, runner.device)
    for i, n in enumerate([5, 13, 9]):
        runner.requests[f"r{i}"].num_computed_tokens = n - 1  # as if the prompt's last token were next
    decode = prepare_batch(runner.requests, {f"r{i}": 1 for i in range(3)}, runner.block_size, runner.device)
    assert not make_graphs(runner, [1, 2, 4]).accepts(prefill)
    assert make_graphs(runner, [1, 2, 4]).accepts(decode)
    assert not make_graphs(runner, [1, 2]).accepts(decode)


def test_padded_static_forward_equals_eager():
    """Three decodes staged into the 4-row static batch over stale buffers: the real rows equal the eager
    forward, the padded row writes no KV and yields finite values. (This forward is what each graph captures.)"""
    runner = make_runner(enforce_eager=True)
    batch = prefill_then_decode_batch(runner, [5, 13, 9])
    ctx = ForwardContext(batch.attn, runner.kv_caches, runner.backend, runner.cos_sin_cache)
    eager = runner.model(batch.input_ids, batch.positions, ctx).clone()  # writes the decode tokens' KV
    kv_after_eager = [(k.clone(), v.clone()) for k, v in runner.kv_caches]

    graphs = make_graphs(runner, capture_sizes(8))
    # Stale values from an earlier, larger step: the padded row must not use them.
    graphs.slot_mapping.fill_(3)
    graphs.seq_lens.fill_(40)
    graphs.block_tables.random_(0, runner.num_blocks)
    bs = graphs.stage(batch)
    assert bs == 4
    assert graphs.slot_mapping[3].item() == -1 and graphs.seq_lens[3].item() == 0
    hidden = graphs.forward_static(bs)
    torch.testing.assert_close(hidden[:3], eager, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(hidden).all()
    # The real rows rewrite their own slots (equal up to GEMM rounding); no other slot changes.
    written = torch.zeros(runner.num_blocks * runner.block_size, dtype=torch.bool)
    written[batch.attn.slot_mapping.cpu()] = True
    for now, before in zip((c for kv in runner.kv_caches for c in kv), (c for kv in kv_after_eager for c in kv)):
        now, before = now.flatten(0, 1).cpu(), before.flatten(0, 1).cpu()
        assert torch.equal(now[~written], before[~written])
        torch.testing.assert_close(now[written], before[written], atol=1e-5, rtol=1e-5)


# Gemma 2 / 3: each layer's window and soft-cap are constants the captured graphs bake in.
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma2", "tiny-gemma3"])
def test_graph_replay_matches_eager(model):
    graphed, eager = make_runner(enforce_eager=False, model=model), make_runner(enforce_eager=True, model=model)
    assert graphed.decode_graphs is not None and eager.decode_graphs is None
    assert sorted(graphed.decode_graphs.graphs) == [1, 2, 4, 8]
    # The same decode batch (3 rows, replayed at 4) both ways.
    batch = prefill_then_decode_batch(graphed, [5, 13, 9])
    ctx = ForwardContext(batch.attn, graphed.kv_caches, graphed.backend, graphed.cos_sin_cache)
    want = graphed.model.compute_logits(graphed.model(batch.input_ids, batch.positions, ctx))
    got = graphed.model.compute_logits(graphed.decode_graphs.run(batch))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # End to end: 1, 3 and 6 concurrent requests (padded to 1, 4 and 8) give the eager greedy tokens.
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (4, 17, 9, 30, 2, 11)]
    params = SamplingParams(temperature=0.0)
    replays = graphed.decode_graphs.num_replays
    for k in (1, 3, 6):
        want = PlanDriver(eager).generate(prompts[:k], params, 10)
        assert PlanDriver(graphed).generate(prompts[:k], params, 10) == want
    assert graphed.decode_graphs.num_replays >= replays + 3 * 9  # every decode step replayed a graph
