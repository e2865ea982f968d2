"""The compile watch: on a GPU a new kernel variant is reported once, and never skipped."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from headrace.kernels.compile_watch import watch_compiles  # noqa: E402


@triton.jit
def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


@pytest.fixture
def reports():
    seen: list[str] = []
    assert watch_compiles(seen.append)
    yield seen
    triton.knobs.runtime.jit_cache_hook = None


def test_the_hook_reports_and_lets_the_compile_happen(reports):
    hook = triton.knobs.runtime.jit_cache_hook
    assert hook(key=None, repr="_add_one[num_warps=4](...)", fn=None, compile={}, is_manual_warmup=False,
                already_compiled=False) is False
    assert reports == ["_add_one[num_warps=4] None"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter compiles nothing")
def test_a_new_variant_is_reported_once(reports):
    x = torch.zeros(100, device="cuda")
    _add_one[(1,)](x, 100, BLOCK=128)
    _add_one[(1,)](x, 100, BLOCK=128)
    assert len(reports) == 1 and "_add_one" in reports[0]
    _add_one[(2,)](x, 100, BLOCK=64)  # a new constexpr: a new variant
    assert len(reports) == 2
    torch.cuda.synchronize()
    assert x[:64].eq(3).all()
