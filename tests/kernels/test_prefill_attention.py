from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton")

from kernels import _utils  # noqa: E402

from .kernel_testing import assert_close  # noqa: E402
from kernels.paged_decode_attention import paged_decode_attention  # noqa: E402
from kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref  # noqa: E402

MakeKV = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

CPU_CASES = [(8, 2, 64, 16), (6, 2, 32, 16), (2, 2, 128, 8)]  # (Hq, Hkv, head_dim, block_size)
GPU_CASES = [(32, 8, 128, 16), (32, 4, 64, 16), (28, 4, 128, 16), (16, 16, 128, 16)]


def _ctx_and_query_lens(device: torch.device) -> list[tuple[int, int]]:
    """(tokens already cached, new tokens) per sequence."""
    if device.type == "cpu":
        return [
            (0, 1),    # one-token prompt
            (0, 37),   # plain prompt, not a block multiple
            (20, 5),   # chunked prefill continuing mid-block
            (64, 17),  # prefix-cache hit: whole cached blocks, then new tokens
            (33, 1),   # single new token after a ragged context (decode-like)
            (0, 16),   # exactly one block
        ]
    lens = [(0, 1), (0, 2048), (4096, 1), (1024, 513), (4000, 100)]
    return lens + [(int(c), int(q)) for c, q in zip(torch.randint(0, 3000, (11,)), torch.randint(1, 1500, (11,)))]


def _run(device: torch.device, dtype: torch.dtype, make_paged_kv: MakeKV, case: tuple[int, int, int, int],
         lens: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    Hq, Hkv, D, bs = case
    seq = [c + n for c, n in lens]
    k_cache, v_cache, tables = make_paged_kv(seq, Hkv, D, bs, dtype, device)
    qlens = torch.tensor([n for _, n in lens])
    qsl = torch.zeros(len(lens) + 1, dtype=torch.int32)
    qsl[1:] = qlens.cumsum(0)
    T = int(qsl[-1])
    q = torch.randn(T, Hq + 2, D, device=device).to(dtype)[:, 1 : Hq + 1]  # strided view
    args = (q, k_cache, v_cache, tables, qsl.to(device),
            torch.tensor(seq, dtype=torch.int32, device=device),
            torch.tensor([c for c, _ in lens], dtype=torch.int32, device=device),
            int(qlens.max()), D**-0.5)
    return paged_prefill_attention(*args), paged_prefill_attention_ref(*args)


@pytest.mark.parametrize("idx64", [False, True], ids=["idx32", "idx64"])
def test_paged_prefill_attention(dev: tuple[torch.device, torch.dtype], make_paged_kv: MakeKV, idx64: bool,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    device, dtype = dev
    monkeypatch.setattr(_utils, "needs_int64", lambda *t: idx64)  # exercise the huge-cache offset path
    for case in CPU_CASES if device.type == "cpu" else GPU_CASES:
        out, ref = _run(device, dtype, make_paged_kv, case, _ctx_and_query_lens(device))
        assert out.shape == ref.shape and out.dtype == dtype
        assert_close(out, ref, dtype)


def test_single_sequence_long_prefix(dev: tuple[torch.device, torch.dtype], make_paged_kv: MakeKV) -> None:
    """Many unmasked tiles before the diagonal (phase 1 loop) for one sequence."""
    device, dtype = dev
    lens = [(96, 40)] if device.type == "cpu" else [(16384, 2048)]
    out, ref = _run(device, dtype, make_paged_kv, (4, 1, 32, 16) if device.type == "cpu" else (32, 8, 128, 16), lens)
    assert_close(out, ref, dtype)


def test_prefill_one_token_matches_decode(dev: tuple[torch.device, torch.dtype], make_paged_kv: MakeKV) -> None:
    """One new token per sequence: prefill and decode kernels must agree."""
    device, dtype = dev
    Hq, Hkv, D, bs = 8, 2, 64, 16
    seq = [1, 17, 50]
    k_cache, v_cache, tables = make_paged_kv(seq, Hkv, D, bs, dtype, device)
    q = torch.randn(len(seq), Hq, D, device=device).to(dtype)
    seq_lens = torch.tensor(seq, dtype=torch.int32, device=device)
    qsl = torch.arange(len(seq) + 1, dtype=torch.int32, device=device)
    pre = paged_prefill_attention(q, k_cache, v_cache, tables, qsl, seq_lens, seq_lens - 1, 1, D**-0.5)
    dec = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, D**-0.5, 2)
    assert_close(pre, dec, dtype)


@pytest.mark.parametrize("draw", range(3))
def test_random_lengths(dev: tuple[torch.device, torch.dtype], make_paged_kv: MakeKV, draw: int) -> None:
    device, dtype = dev
    cpu = device.type == "cpu"
    S = int(torch.randint(1, 5 if cpu else 40, ()))
    ctx = torch.randint(0, 70 if cpu else 4000, (S,))
    ctx[torch.rand(S) < 0.3] = 0  # plain prompts
    qlen = torch.randint(1, 30 if cpu else 1200, (S,))
    case = (int(torch.randint(1, 3, ())) * 3, 1, 32, 16) if cpu else (32, 8, 128, 16)
    out, ref = _run(device, dtype, make_paged_kv, case, list(zip(ctx.tolist(), qlen.tolist())))
    assert_close(out, ref, dtype)
