"""The small-batch GEMV behind the linear layers: the dispatch (CPU, Triton interpreter) and the start-up
selection against cuBLAS (GPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from services.gpu_worker.gemv_select import linear_modules, select_gemv  # noqa: E402
from services.gpu_worker.model.llama import ForwardContext  # noqa: E402
from tests.services.gpu_worker.plan_driver import PlanDriver  # noqa: E402
from tests.services.gpu_worker.test_cuda_graphs import HAS_CUDA, make_runner, prefill_then_decode_batch  # noqa: E402
from common.sampling_params import SamplingParams  # noqa: E402


def test_linears_take_the_gemv_up_to_their_row_limit(monkeypatch):
    """A 3-row decode step through GEMV-backed linears equals the cuBLAS (F.linear) forward, and the GEMV
    really ran for every linear of the model, LM head included."""
    runner = make_runner(enforce_eager=True)
    batch = prefill_then_decode_batch(runner, [5, 13, 9])
    ctx = ForwardContext(batch.attn, runner.kv_caches, runner.backend, runner.cos_sin_cache)
    want = runner.model.compute_logits(runner.model(batch.input_ids, batch.positions, ctx))

    import kernels.gemv

    calls = []
    real = kernels.gemv.gemv
    monkeypatch.setattr(kernels.gemv, "gemv", lambda x, w, b=None: calls.append(x.shape[0]) or real(x, w, b))
    modules = linear_modules(runner.model)
    for m in modules:
        m.gemv_max_rows = 3
    got = runner.model.compute_logits(runner.model(batch.input_ids, batch.positions, ctx))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert calls == [3] * len(modules)  # each linear once per forward, at the step's 3 rows
    for m in modules:
        m.gemv_max_rows = 2  # below the step's rows: cuBLAS again
    calls.clear()
    runner.model(batch.input_ids, batch.positions, ctx)
    assert calls == []


@pytest.mark.skipif(not HAS_CUDA, reason="timing needs a GPU")
def test_start_up_selection_keeps_the_tokens():
    runner = make_runner(enforce_eager=False)  # selection ran at start-up
    report = runner.gemv_choice
    assert report and all(r["gemv_max_rows"] in (0, 1, 2, 4, 8) for r in report.values())
    assert {tuple(m.weight.shape) for m in linear_modules(runner.model)} == set(report)
    again = select_gemv(runner.model, reps=3)
    assert set(again) == set(report)
    eager = make_runner(enforce_eager=True)
    for m in linear_modules(eager.model):
        m.gemv_max_rows = 0
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (4, 17, 9)]
    params = SamplingParams(temperature=0.0)
    assert PlanDriver(runner).generate(prompts, params, 8) == PlanDriver(eager).generate(prompts, params, 8)
