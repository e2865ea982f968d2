"""Shared setup for the Triton kernel tests.

Without CUDA the kernels run in Triton's CPU interpreter; TRITON_INTERPRET must be set before
any @triton.jit decorator runs (i.e. before kernels.* modules are imported), hence here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# (device, dtype): fp32 on CPU under the interpreter, bf16 on a real GPU.
_CASES = ([pytest.param(("cpu", torch.float32), id="cpu-fp32")] if INTERPRET else []) + (
    [pytest.param(("cuda", torch.bfloat16), id="cuda-bf16")] if HAS_CUDA and not INTERPRET else []
)


@pytest.fixture(params=_CASES or [pytest.param(None, marks=pytest.mark.skip(reason="no Triton backend"))])
def dev(request: pytest.FixtureRequest) -> tuple[torch.device, torch.dtype]:
    if not HAS_TRITON:
        pytest.skip("triton not importable")
    device, dtype = request.param
    return torch.device(device), dtype


@pytest.fixture(autouse=True)
def fresh_seed() -> int:
    """Fresh random inputs every run; the seed is printed so a failure can be replayed."""
    seed = int(os.environ.get("KERNEL_TEST_SEED", torch.seed() % 2**31))
    torch.manual_seed(seed)
    print(f"KERNEL_TEST_SEED={seed}")
    return seed


@pytest.fixture(autouse=True)
def poison_empty() -> Iterator[None]:
    """Make wrapper allocations NaN-filled so unwritten outputs fail loudly."""
    if not HAS_TRITON:
        yield
        return
    from headrace.kernels import _utils

    old = _utils.POISON_EMPTY
    _utils.POISON_EMPTY = True
    yield
    _utils.POISON_EMPTY = old


@pytest.fixture
def make_paged_kv() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Factory: random paged K/V caches + block tables for the given sequence lengths.

    Physical blocks are a random permutation (plus spare blocks) so any indexing bug that
    ignores the block table reads the wrong data; unused table entries point at real blocks
    of other sequences rather than out of bounds.
    """

    def make(
        seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
        dtype: torch.dtype, device: torch.device, extra_cols: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        need = [-(-n // block_size) for n in seq_lens]
        num_blocks = sum(need) + 3
        max_blocks = max(need + [1]) + extra_cols
        perm = torch.randperm(num_blocks, device=device)
        table = perm[torch.randint(0, num_blocks, (len(seq_lens), max_blocks), device=device)]
        used = 0
        for i, n in enumerate(need):
            table[i, :n] = perm[used : used + n]
            used += n
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        k_cache = torch.randn(shape, device=device).to(dtype)
        v_cache = torch.randn(shape, device=device).to(dtype)
        return k_cache, v_cache, table.to(torch.int32)

    return make
