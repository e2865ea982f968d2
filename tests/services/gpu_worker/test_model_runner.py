"""The runner's overlapped steps: step t+1 is launched before step t is finished, its decodes reading the
token step t samples from the device. Whatever the overlap, every request's tokens must equal what one
step at a time gives: greedy, seeded random (the draw depends on the output length, pending tokens
included), and penalties (which make the runner wait for the pending step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headrace.common.config import CacheConfig, EngineConfig, ModelConfig
from headrace.common.messages import CachedRequestData, NewRequestData, StepPlan
from headrace.common.sampling_params import SamplingParams
from headrace.services.gpu_worker import model_runner
from headrace.services.gpu_worker.batch_inputs import upload
from headrace.services.gpu_worker.model_runner import ModelRunner
from tests.configs import resolved

PROMPTS = [[5, 9, 2, 7, 1, 3], [11, 4], [8, 8, 8, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module")
def runner():
    cfg = EngineConfig(model=ModelConfig(model="random:tiny-llama", seed=3, max_model_len=256),
                       cache=CacheConfig(num_blocks=64))
    return ModelRunner(resolved(cfg), log=lambda *_: None)


def plans(params: SamplingParams, num_new: int, block_size: int):
    """Plans as an asynchronous scheduler makes them: step k+1 schedules the decode of the token step k
    samples. Prefill whole prompts in step 0 (request 2 in two chunks: 0 and 1), then decode."""
    blocks = {i: list(range(8 * i, 8 * i + 8)) for i in range(len(PROMPTS))}
    first = StepPlan(step_id=0)
    computed = {}
    for i, p in enumerate(PROMPTS):
        n = len(p) if i != 2 else 10
        first.new_requests.append(NewRequestData(f"r{i}", p, [], params, blocks[i], 0, 100 + i))
        first.num_scheduled_tokens[f"r{i}"] = n
        computed[i] = n
    yield first
    step = 1
    made = {i: (1 if i != 2 else 0) for i in range(len(PROMPTS))}  # tokens sampled (or in flight) so far
    while any(m < num_new for m in made.values()):
        plan = StepPlan(step_id=step)
        for i, p in enumerate(PROMPTS):
            if made[i] >= num_new:
                continue
            n = len(p) - computed[i] if computed[i] < len(p) else 1
            plan.cached_requests.append(CachedRequestData(f"r{i}", [], computed[i]))
            plan.num_scheduled_tokens[f"r{i}"] = n
            computed[i] += n
            made[i] += 1
        yield plan
        step += 1
    yield StepPlan(step_id=step, finished_req_ids=[f"r{i}" for i in range(len(PROMPTS))])


def run(runner: ModelRunner, params: SamplingParams, overlap: bool, num_new: int = 6) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(PROMPTS))}

    def collect(result):
        for rid, tok in zip(result.req_ids, result.sampled_token_ids):
            out[rid].append(tok)

    for plan in plans(params, num_new, runner.block_size):
        if not overlap:
            collect(runner.execute(plan))
            continue
        runner.launch(plan)
        if runner.num_in_flight == 2:  # finish step t only after step t+1 is queued behind it
            collect(runner.finish_oldest()[1])
    while runner.num_in_flight:
        collect(runner.finish_oldest()[1])
    assert not runner.requests
    return out


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=64),
    SamplingParams(temperature=1.0, max_tokens=64),
    SamplingParams(temperature=0.8, top_k=5, max_tokens=64),
    SamplingParams(temperature=1.0, presence_penalty=1.5, repetition_penalty=1.3, max_tokens=64),
], ids=["greedy", "seeded", "top-k", "penalties"])
def test_overlapped_steps_equal_one_step_at_a_time(runner, params):
    want = run(runner, params, overlap=False)
    got = run(runner, params, overlap=True)
    assert got == want
    assert all(len(toks) == 6 for toks in got.values())


def test_overlapped_decode_reads_the_pending_token_on_the_device(runner, monkeypatch):
    """The overlap is real: step t+1 is prepared while step t's tokens are still unresolved."""
    seen = []
    original = model_runner.prepare_batch

    def spy(requests, scheduled, block_size, device, pending=None, **kwargs):
        seen.append(pending is not None and not pending.resolved)
        return original(requests, scheduled, block_size, device, pending, **kwargs)

    monkeypatch.setattr(model_runner, "prepare_batch", spy)
    run(runner, SamplingParams(temperature=0.0, max_tokens=64), overlap=True)
    assert sum(seen) >= 4


def test_steps_finish_in_launch_order(runner):
    first, second = StepPlan(step_id=0), StepPlan(step_id=1)
    runner.launch(first)
    runner.launch(second)
    assert runner.num_in_flight == 2 and runner.oldest_plan is first
    assert runner.finish_oldest()[0] is first
    assert runner.finish_oldest()[0] is second
    assert runner.num_in_flight == 0
    with pytest.raises(AssertionError, match="no step in flight"):
        runner.finish_oldest()


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_uploaded_step_arrays_start_on_16_byte_boundaries(runner, dtype):
    """Every view of a step's packed upload keeps its values and a 16-byte-aligned start, whatever the sizes
    before it (Triton compiles a variant per pointer alignment class)."""
    arrays = [np.arange(n, dtype=dtype) + 10 * n for n in (3, 5, 1, 0, 7)]
    views = upload(arrays, dtype, runner.device)
    for a, v in zip(arrays, views):
        assert v.tolist() == a.tolist()
        assert v.data_ptr() % 16 == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter compiles nothing")
def test_no_kernel_compiles_after_start_up():
    """Serving-like steps (batch sizes, prompt lengths, chunking, decodes beside prefills, random sampling)
    compile no Triton variant after the runner's start-up: each compile would stall every request."""
    import triton

    from headrace.kernels.compile_watch import watch_compiles
    from tests.services.gpu_worker.plan_driver import PlanDriver
    from tests.services.gpu_worker.test_cuda_graphs import make_runner

    runner = make_runner(enforce_eager=False)
    compiled: list[str] = []
    assert watch_compiles(compiled.append)
    try:
        g = torch.Generator().manual_seed(7)
        for num_prompts, chunk, params in ((1, None, SamplingParams(temperature=0.0)),
                                           (3, 7, SamplingParams(temperature=0.8, seed=1)),
                                           (5, 5, SamplingParams(temperature=1.0, top_k=5)),
                                           (6, 11, SamplingParams(temperature=0.0)),
                                           (2, 3, SamplingParams(temperature=0.5, seed=2))):
            prompts = [torch.randint(3, 512, (int(n),), generator=g).tolist()
                       for n in torch.randint(1, 30, (num_prompts,), generator=g)]
            PlanDriver(runner, chunk_size=chunk).generate(prompts, params, 5)
    finally:
        triton.knobs.runtime.jit_cache_hook = None
    assert compiled == []
