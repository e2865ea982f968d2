"""Sliding-window and soft-capped attention in both paged kernels, against their torch references, with
windows smaller than the context. Blocks wholly before the first key any query of a sequence sees are
poisoned with NaN: a kernel that read them (start at block 0, mask later) would return NaN."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton")

from .kernel_testing import assert_close  # noqa: E402
from .test_prefill_attention import _new_kv_inputs  # noqa: E402
from headrace.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref  # noqa: E402
from headrace.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref  # noqa: E402

MakeKV = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

# (window, softcap): a window of one token, one inside a block, one across blocks and tiles (soft-capped),
# and a Gemma 2-like global layer (soft-cap, no window).
WINDOWS = [(1, None), (5, None), (40, 2.0), (None, 2.0)]


def _poison_before(caches: tuple[torch.Tensor, ...], table: torch.Tensor, first_key: int) -> None:
    """NaN into every block of one sequence that ends before `first_key`."""
    block_size = caches[0].shape[1]
    for j in range(first_key // block_size):
        for cache in caches:
            cache[int(table[j])] = float("nan")


@pytest.mark.parametrize("window,softcap", WINDOWS)
@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_decode_window_and_softcap(dev, make_paged_kv: MakeKV, window, softcap, num_kv_splits) -> None:
    device, dtype = dev
    Hq, Hkv, D, bs = 8, 2, 64, 16
    lens = [0, 1, 5, 17, 64, 100]
    k_cache, v_cache, tables = make_paged_kv(lens, Hkv, D, bs, dtype, device)
    for b, n in enumerate(lens):
        if window:
            _poison_before((k_cache, v_cache), tables[b], n - window)
    q = torch.randn(len(lens), Hq, D, device=device).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    args = (q, k_cache, v_cache, tables, seq_lens, D**-0.5, num_kv_splits)
    out = paged_decode_attention(*args, window=window, softcap=softcap)
    ref = paged_decode_attention_ref(*args, window=window, softcap=softcap)
    assert not out.isnan().any()
    assert_close(out, ref, dtype)
    assert torch.equal(out[0], torch.zeros_like(out[0])), "seq_len 0 must give zeros"


def test_the_window_and_softcap_change_the_result(dev, make_paged_kv: MakeKV) -> None:
    """The references themselves: a window shorter than the context and a small cap both matter."""
    device, dtype = dev
    k_cache, v_cache, tables = make_paged_kv([50], 2, 64, 16, dtype, device)
    q = torch.randn(1, 4, 64, device=device).to(dtype)
    args = (q, k_cache, v_cache, tables, torch.tensor([50], dtype=torch.int32, device=device), 0.125)
    full = paged_decode_attention_ref(*args)
    assert (paged_decode_attention_ref(*args, window=20) - full).abs().max() > 1e-2
    assert (paged_decode_attention_ref(*args, softcap=0.5) - full).abs().max() > 1e-2


# (tokens cached before the step, new tokens): plain prompts longer than the windows, chunks continuing
# mid-block past the window, one new token after a long context.
PREFILL_LENS = [(0, 45), (20, 5), (64, 17), (33, 1), (5, 40), (90, 30)]


def _prefill_inputs(device, dtype, make_paged_kv: MakeKV, window: int | None) -> dict:
    x = _new_kv_inputs(device, dtype, make_paged_kv, (6, 2, 32, 16), PREFILL_LENS)
    for s, (ctx, _) in enumerate(PREFILL_LENS):
        if window:  # before the first key the sequence's first query sees
            _poison_before((x["k_cache"], x["v_cache"], x["k_pre"], x["v_pre"]), x["tables"][s], ctx - window + 1)
    return x


# Each window at the default tiles; the two windows that cross tiles also with a query tile narrower than
# the key tile.
PREFILL_CASES = [(w, c, None) for w, c in WINDOWS] + [(5, None, (16, 32, 4, 1)), (40, 2.0, (16, 32, 4, 1))]


@pytest.mark.parametrize("window,softcap,config", PREFILL_CASES)
def test_prefill_window_and_softcap(dev, make_paged_kv: MakeKV, window, softcap, config) -> None:
    """Both the paged path and the contiguous one (this step's keys from k_new / v_new)."""
    device, dtype = dev
    if device.type == "cuda" and config is not None:
        pytest.skip("tile-shape coverage is for the interpreter; the GPU runs its tuned tiles")
    x = _prefill_inputs(device, dtype, make_paged_kv, window)
    common = (x["tables"], x["qsl"], x["seq_lens"], x["ctx"], x["max_q"], x["scale"])
    ref = paged_prefill_attention_ref(x["q"], x["k_cache"], x["v_cache"], *common, window=window, softcap=softcap)
    paged = paged_prefill_attention(x["q"], x["k_cache"], x["v_cache"], *common, config, window=window,
                                    softcap=softcap)
    contiguous = paged_prefill_attention(x["q"], x["k_pre"], x["v_pre"], *common, config, k_new=x["k_new"],
                                         v_new=x["v_new"], window=window, softcap=softcap)
    rows = slice(int(x["qsl"][0]), int(x["qsl"][-1]))
    assert not paged[rows].isnan().any() and not contiguous[rows].isnan().any()
    assert_close(paged[rows], ref[rows], dtype)
    assert_close(contiguous[rows], ref[rows], dtype)

