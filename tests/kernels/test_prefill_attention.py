from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton")

from headrace.kernels import _utils  # noqa: E402

from .kernel_testing import assert_close  # noqa: E402
from headrace.kernels.paged_decode_attention import paged_decode_attention  # noqa: E402
from headrace.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref  # noqa: E402

MakeKV = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

CPU_CASES = [(8, 2, 64, 16), (6, 2, 32, 16), (2, 2, 128, 8), (4, 2, 48, 16)]  # (Hq, Hkv, head_dim, block_size)
# Falcon-7B's 71 query heads on one KV head; Phi-3-mini's heads, 96 wide (masked to 128 in the kernels; 48 on
# CPU).
GPU_CASES = [(32, 8, 128, 16), (32, 4, 64, 16), (28, 4, 128, 16), (16, 16, 128, 16), (71, 1, 64, 16),
             (32, 32, 96, 16)]


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


@pytest.mark.parametrize("window,softcap", [(None, None), (12, 3.0)])
def test_prefill_one_token_matches_decode(dev: tuple[torch.device, torch.dtype], make_paged_kv: MakeKV,
                                          window: int | None, softcap: float | None) -> None:
    """One new token per sequence: prefill and decode kernels must agree, also with a window and soft-capping."""
    device, dtype = dev
    Hq, Hkv, D, bs = 8, 2, 64, 16
    seq = [1, 17, 50]
    k_cache, v_cache, tables = make_paged_kv(seq, Hkv, D, bs, dtype, device)
    q = torch.randn(len(seq), Hq, D, device=device).to(dtype)
    seq_lens = torch.tensor(seq, dtype=torch.int32, device=device)
    qsl = torch.arange(len(seq) + 1, dtype=torch.int32, device=device)
    pre = paged_prefill_attention(q, k_cache, v_cache, tables, qsl, seq_lens, seq_lens - 1, 1, D**-0.5,
                                  window=window, softcap=softcap)
    dec = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, D**-0.5, 2, window=window, softcap=softcap)
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


# ---- The contiguous path: this step's keys and values passed as k_new / v_new ([T, Hkv, D], rows like q).

NEW_KV_CPU_CASES = [(4, 4, 64, 16), (8, 2, 128, 16), (6, 2, 64, 16)]  # GQA group 1, 4 and 3
NEW_KV_GPU_CASES = [(32, 8, 128, 16), (32, 32, 128, 16), (32, 4, 64, 16)]


def _new_kv_lens(device: torch.device) -> list[tuple[int, int]]:
    """(tokens cached before the step, new tokens) per sequence: prompts with and without a cached prefix."""
    if device.type == "cpu":
        return [
            (0, 37),   # plain prompt, not a tile multiple
            (20, 5),   # chunk continuing mid-block: the prefix's last tile is partial
            (64, 17),  # prefix-cache hit on whole blocks
            (0, 64),   # plain prompt spanning several unmasked tiles
            (33, 1),   # one new token after a ragged prefix
            (5, 40),   # short ragged prefix, long chunk
            (0, 1),    # one-token prompt
        ]
    return [(0, 2048), (1024, 513), (0, 1), (4000, 100), (17, 300), (0, 777), (2048, 2048)]


def _new_kv_inputs(device: torch.device, dtype: torch.dtype, make_paged_kv: MakeKV, case: tuple[int, int, int, int],
                   lens: list[tuple[int, int]], pad: tuple[int, int] = (3, 5), strided: bool = True) -> dict:
    """Full caches (for the reference and the paged path), caches holding only each sequence's prefix (NaN
    everywhere else), and k_new / v_new gathered from the full caches. `pad` rows before and after the
    sequences belong to no sequence: their q rows must stay unwritten and their k_new / v_new rows (NaN)
    must never be read. `strided`: k_new / v_new are views into a wider [T, heads, D] buffer."""
    Hq, Hkv, D, bs = case
    seq = [c + n for c, n in lens]
    k_cache, v_cache, tables = make_paged_kv(seq, Hkv, D, bs, dtype, device)
    qlens = torch.tensor([n for _, n in lens])
    qsl = torch.full((len(lens) + 1,), pad[0], dtype=torch.int32)
    qsl[1:] += qlens.cumsum(0).to(torch.int32)
    T = int(qsl[-1]) + pad[1]
    q = torch.randn(T, Hq + 2, D, device=device).to(dtype)[:, 1 : Hq + 1]
    if strided:
        kv_new = torch.full((T, 2 * Hkv + 3, D), float("nan"), device=device, dtype=dtype)
        k_new, v_new = kv_new[:, 1 : Hkv + 1], kv_new[:, Hkv + 3 :]
    else:
        k_new = torch.full((T, Hkv, D), float("nan"), device=device, dtype=dtype)
        v_new = torch.full_like(k_new, float("nan"))
    k_pre = torch.full_like(k_cache, float("nan"))
    v_pre = torch.full_like(v_cache, float("nan"))
    for s, (c, n) in enumerate(lens):
        pos = torch.arange(c + n, device=device)
        blk, off = tables[s, pos // bs].long(), pos % bs
        a = int(qsl[s])
        k_new[a : a + n] = k_cache[blk[c:], off[c:]]
        v_new[a : a + n] = v_cache[blk[c:], off[c:]]
        k_pre[blk[:c], off[:c]] = k_cache[blk[:c], off[:c]]
        v_pre[blk[:c], off[:c]] = v_cache[blk[:c], off[:c]]
    return {
        "q": q, "k_cache": k_cache, "v_cache": v_cache, "k_pre": k_pre, "v_pre": v_pre, "tables": tables,
        "qsl": qsl.to(device), "seq_lens": torch.tensor(seq, dtype=torch.int32, device=device),
        "ctx": torch.tensor([c for c, _ in lens], dtype=torch.int32, device=device),
        "max_q": int(qlens.max()), "scale": D**-0.5, "k_new": k_new, "v_new": v_new, "pad": pad,
    }


def _paged(x: dict, config=None) -> torch.Tensor:
    return paged_prefill_attention(x["q"], x["k_cache"], x["v_cache"], x["tables"], x["qsl"], x["seq_lens"],
                                   x["ctx"], x["max_q"], x["scale"], config)


def _contiguous(x: dict, config=None, k_new=None, v_new=None) -> torch.Tensor:
    """The new path, given caches that hold nothing but the prefixes."""
    return paged_prefill_attention(x["q"], x["k_pre"], x["v_pre"], x["tables"], x["qsl"], x["seq_lens"], x["ctx"],
                                   x["max_q"], x["scale"], config,
                                   k_new=x["k_new"] if k_new is None else k_new,
                                   v_new=x["v_new"] if v_new is None else v_new)


def _ref(x: dict) -> torch.Tensor:
    return paged_prefill_attention_ref(x["q"], x["k_cache"], x["v_cache"], x["tables"], x["qsl"], x["seq_lens"],
                                       x["ctx"], x["max_q"], x["scale"])


def _covered(x: dict) -> slice:
    return slice(int(x["qsl"][0]), int(x["qsl"][-1]))


@pytest.mark.parametrize("config", [None, (16, 32, 4, 1), (64, 16, 4, 1)], ids=["default", "bq<bn", "bq>bn"])
def test_new_kv_matches_reference_and_paged(dev: tuple[torch.device, torch.dtype], make_paged_kv: MakeKV,
                                            config: tuple[int, int, int, int] | None) -> None:
    """Keys of this step come from k_new / v_new (the caches hold only the prefixes, NaN elsewhere):
    same result as the reference and as the paged path; rows outside query_start_loc stay unwritten."""
    device, dtype = dev
    if device.type == "cuda" and config is not None:
        pytest.skip("tile-shape coverage is for the interpreter; the GPU runs its tuned tiles")
    for case in NEW_KV_CPU_CASES if device.type == "cpu" else NEW_KV_GPU_CASES:
        x = _new_kv_inputs(device, dtype, make_paged_kv, case, _new_kv_lens(device))
        out, ref, paged = _contiguous(x, config), _ref(x), _paged(x, config)
        rows = _covered(x)
        assert out.shape == ref.shape and out.dtype == dtype
        assert_close(out[rows], ref[rows], dtype)
        assert_close(out[rows], paged[rows], dtype)
        assert out[: rows.start].isnan().all() and out[rows.stop :].isnan().all(), "wrote rows of no sequence"


@pytest.mark.parametrize("idx64", [False, True], ids=["idx32", "idx64"])
def test_new_kv_contiguous_buffers(dev: tuple[torch.device, torch.dtype], make_paged_kv: MakeKV, idx64: bool,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Contiguous [T, Hkv, D] k_new / v_new with no padding rows; also the int64 path of the prefix gathers."""
    device, dtype = dev
    monkeypatch.setattr(_utils, "needs_int64", lambda *t: idx64)
    case = (8, 2, 128, 16) if device.type == "cpu" else (32, 8, 128, 16)
    x = _new_kv_inputs(device, dtype, make_paged_kv, case, _new_kv_lens(device), pad=(0, 0), strided=False)
    assert x["k_new"].is_contiguous() and x["v_new"].is_contiguous()
    assert_close(_contiguous(x), _ref(x), dtype)


def test_new_kv_wrong_rows_fail(dev: tuple[torch.device, torch.dtype], make_paged_kv: MakeKV) -> None:
    """The data is sensitive to the row mapping: k_new or v_new one row off gives a clearly wrong result
    (so the tests above would catch a kernel that reads position p from the wrong row)."""
    device, dtype = dev
    case = (8, 2, 64, 16) if device.type == "cpu" else (32, 8, 128, 16)
    x = _new_kv_inputs(device, dtype, make_paged_kv, case, _new_kv_lens(device))
    rows, ref = _covered(x), _ref(x)
    assert_close(_contiguous(x)[rows], ref[rows], dtype)
    for which in ("k_new", "v_new"):
        shifted = x[which].clone()
        shifted[rows.start + 1 : rows.stop] = x[which][rows.start : rows.stop - 1]  # finite, one row late
        out = _contiguous(x, **{which: shifted})
        err = float((out[rows].float() - ref[rows].float()).norm() / ref[rows].float().norm())
        assert err > 0.05, f"{which} shifted by one row went unnoticed (relative error {err:.1e})"


def test_new_kv_clipped_seq_lens(dev: tuple[torch.device, torch.dtype], make_paged_kv: MakeKV) -> None:
    """seq_lens below context + new tokens bound the visible keys (as in the reference); a sequence with
    no key at all gives zeros, not NaN. (The paged path assumes seq_lens = context + new tokens: its
    unmasked tiles do not clip at seq_lens, so it is not compared here.)"""
    device, dtype = dev
    lens = [(0, 20), (20, 12), (16, 9), (0, 7)]
    x = _new_kv_inputs(device, dtype, make_paged_kv, (8, 2, 64, 16), lens)
    x["seq_lens"] = torch.tensor([13, 25, 10, 0], dtype=torch.int32, device=device)  # last: nothing visible
    out = _contiguous(x)
    rows = slice(int(x["qsl"][0]), int(x["qsl"][3]))
    assert_close(out[rows], _ref(x)[rows], dtype)
    last = slice(int(x["qsl"][3]), int(x["qsl"][4]))
    assert (out[last] == 0).all() and (_paged(x)[last] == 0).all()


def test_new_kv_arguments(dev: tuple[torch.device, torch.dtype], make_paged_kv: MakeKV) -> None:
    device, dtype = dev
    x = _new_kv_inputs(device, dtype, make_paged_kv, (4, 2, 32, 16), [(0, 3)])
    with pytest.raises(ValueError):
        paged_prefill_attention(x["q"], x["k_cache"], x["v_cache"], x["tables"], x["qsl"], x["seq_lens"], x["ctx"],
                                x["max_q"], x["scale"], k_new=x["k_new"])
