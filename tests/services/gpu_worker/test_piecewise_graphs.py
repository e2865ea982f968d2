"""Piecewise CUDA graphs (prefill and mixed steps): the token ladder, the cut around attention and the
padding (checked on CPU by running the pieces uncaptured, Triton in its interpreter), and on a GPU, the
captured pieces against the eager forward, end to end."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from headrace.common.messages import CachedRequestData, NewRequestData, StepPlan  # noqa: E402
from headrace.common.sampling_params import SamplingParams  # noqa: E402
from headrace.services.gpu_worker.batch_inputs import prepare_batch  # noqa: E402
from headrace.services.gpu_worker.model.llama import ForwardContext  # noqa: E402
from headrace.services.gpu_worker.piecewise_graphs import PiecewiseGraphs, capture_token_sizes  # noqa: E402
from tests.services.gpu_worker.plan_driver import PlanDriver  # noqa: E402
from tests.services.gpu_worker.test_cuda_graphs import HAS_CUDA, add_requests, make_runner  # noqa: E402


def test_capture_token_sizes():
    assert capture_token_sizes(1024, 8192) == [16, 32, 64, 128, 192, 256, 320, 384, 512, 640, 768, 1024]
    assert capture_token_sizes(1024, 300) == [16, 32, 64, 128, 192, 256, 300]  # the step budget caps it
    assert capture_token_sizes(100, 8192) == [16, 32, 64, 100]
    assert capture_token_sizes(8, 8192) == [8]


def make_pieces(runner, sizes: list[int]) -> PiecewiseGraphs:
    graphs = PiecewiseGraphs(runner.model, runner.backend, runner.kv_caches, runner.cos_sin_cache, sizes)
    graphs.build_uncaptured()
    return graphs


def mixed_batch(runner):
    """Prefill three prompts, then prepare (not run) a step of their three decodes beside an 11-token
    prefill of a fourth request: 14 tokens, 4 sequences."""
    lens = [5, 13, 9]
    runner.execute(add_requests(runner, lens))
    first_free = sum(n // runner.block_size + 2 for n in lens)
    prompt = torch.randint(3, 512, (11,), generator=torch.Generator().manual_seed(3)).tolist()
    plan = StepPlan(step_id=1, cached_requests=[CachedRequestData(f"r{i}", [], n) for i, n in enumerate(lens)],
                    new_requests=[NewRequestData("r3", prompt, [], SamplingParams(temperature=0.0),
                                                 [first_free, first_free + 1], 0, 0)])
    plan.num_scheduled_tokens = {f"r{i}": 1 for i in range(3)} | {"r3": 11}
    runner._apply_plan(plan)
    return prepare_batch(runner.requests, plan.num_scheduled_tokens, runner.block_size, runner.device)


def test_pieces_with_eager_attention_equal_the_eager_forward():
    """A 14-token mixed step run piece by piece at size 16, over stale static buffers: the real rows equal
    the eager forward; the two padded rows write no KV."""
    runner = make_runner(enforce_eager=True)
    batch = mixed_batch(runner)
    assert batch.attn.num_decodes == 3 and batch.attn.num_seqs == 4 and batch.input_ids.shape[0] == 14
    ctx = ForwardContext(batch.attn, runner.kv_caches, runner.backend, runner.cos_sin_cache)
    eager = runner.model(batch.input_ids, batch.positions, ctx).clone()  # writes the step's KV
    kv_after_eager = [(k.clone(), v.clone()) for k, v in runner.kv_caches]

    graphs = make_pieces(runner, [8, 16, 32])
    for buf in (graphs.q, graphs.k, graphs.v, graphs.residual, graphs.attn_out, graphs.hidden):
        buf.normal_()  # stale values from an earlier, larger step
    graphs.slot_mapping.fill_(3)
    graphs.input_ids.fill_(7)
    hidden = graphs.run(batch)
    assert graphs.slot_mapping[14:16].tolist() == [-1, -1] and graphs.positions[14:16].tolist() == [0, 0]
    assert hidden.shape == eager.shape
    torch.testing.assert_close(hidden, eager, atol=1e-5, rtol=1e-5)
    written = torch.zeros(runner.num_blocks * runner.block_size, dtype=torch.bool)
    written[batch.attn.slot_mapping.cpu()] = True
    for now, before in zip((c for kv in runner.kv_caches for c in kv), (c for kv in kv_after_eager for c in kv)):
        now, before = now.flatten(0, 1).cpu(), before.flatten(0, 1).cpu()
        assert torch.equal(now[~written], before[~written])  # slot 3 (stale) and the padding untouched
        torch.testing.assert_close(now[written], before[written], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])  # Gemma 3: scaled embeddings, windows
def test_runner_steps_through_pieces_give_the_eager_tokens(model):
    """Chunked prefills (7 tokens a step) beside decodes, through the runner: every non-decode step goes
    through the pieces and the greedy tokens equal the eager runner's."""
    eager, pieced = make_runner(enforce_eager=True, model=model), make_runner(enforce_eager=True, model=model)
    pieced.piecewise_graphs = make_pieces(pieced, [8, 16, 32])
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (4, 17, 9)]
    params = SamplingParams(temperature=0.0)
    want = PlanDriver(eager, chunk_size=7).generate(prompts, params, 4)
    assert PlanDriver(pieced, chunk_size=7).generate(prompts, params, 4) == want
    assert pieced.piecewise_graphs.num_replays >= 3  # the chunked prefill steps (decode-only steps run eagerly here)


def assert_same_prompt_logprobs(got: dict, want: dict, tol: float) -> None:
    assert got.keys() == want.keys() and want
    for rid, scores in want.items():
        torch.testing.assert_close(torch.tensor(got[rid].token_logprobs), torch.tensor(scores.token_logprobs),
                                   atol=tol, rtol=tol)
        assert len(got[rid].top_token_ids) == len(scores.top_token_ids) == 2 * len(scores.token_logprobs)


def test_prompt_logprobs_through_pieces_equal_the_eager_runners():
    """Scoring requests' prompt rows come out of the pieces' hidden states as they do eagerly, chunked."""
    eager, pieced = make_runner(enforce_eager=True), make_runner(enforce_eager=True)
    pieced.piecewise_graphs = make_pieces(pieced, [8, 16, 32])
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (4, 17, 9)]
    params = SamplingParams(temperature=0.0, prompt_logprobs=2)
    want, got = PlanDriver(eager, chunk_size=7), PlanDriver(pieced, chunk_size=7)
    assert got.generate(prompts, params, 2) == want.generate(prompts, params, 2)
    assert_same_prompt_logprobs(got.prompt_logprobs, want.prompt_logprobs, 1e-5)
    assert sorted(len(s.token_logprobs) for s in want.prompt_logprobs.values()) == [3, 8, 16]


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma2", "tiny-gemma3"])
def test_captured_pieces_match_eager(model):
    graphed, eager = make_runner(enforce_eager=False, model=model), make_runner(enforce_eager=True, model=model)
    assert graphed.piecewise_graphs is not None and eager.piecewise_graphs is None
    batch = mixed_batch(graphed)
    ctx = ForwardContext(batch.attn, graphed.kv_caches, graphed.backend, graphed.cos_sin_cache)
    want = graphed.model.compute_logits(graphed.model(batch.input_ids, batch.positions, ctx))
    got = graphed.model.compute_logits(graphed.piecewise_graphs.run(batch))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (4, 17, 9, 30, 2, 11)]
    params = SamplingParams(temperature=0.0, prompt_logprobs=2)
    replays = graphed.piecewise_graphs.num_replays
    for chunk in (None, 7):
        eager_driver, graphed_driver = PlanDriver(eager, chunk_size=chunk), PlanDriver(graphed, chunk_size=chunk)
        want = eager_driver.generate(prompts, params, 6)
        assert graphed_driver.generate(prompts, params, 6) == want
        assert_same_prompt_logprobs(graphed_driver.prompt_logprobs, eager_driver.prompt_logprobs, 1e-3)
    assert graphed.piecewise_graphs.num_replays > replays + 5
