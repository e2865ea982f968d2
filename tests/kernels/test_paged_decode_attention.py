from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton")

from headrace.kernels import _utils  # noqa: E402

from .kernel_testing import assert_close  # noqa: E402
from headrace.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref  # noqa: E402

MakeKV = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

# (Hq, Hkv, head_dim, block_size); group sizes 4, 3 (non power of two) and 1 (MHA).
CPU_CASES = [(8, 2, 64, 16), (6, 2, 32, 16), (2, 2, 128, 8), (4, 2, 48, 16)]
# Falcon-7B's 71 query heads on one KV head; Phi-3-mini's heads, 96 wide (masked to 128 in the kernels; 48 on
# CPU).
GPU_CASES = [(32, 8, 128, 16), (32, 4, 64, 16), (28, 4, 128, 16), (16, 16, 128, 16), (71, 1, 64, 16),
             (32, 32, 96, 16)]


def _seq_lens(device: torch.device) -> list[int]:
    if device.type == "cpu":  # 0 = CUDA-graph padding row; 1; multiple and non-multiple of block
        return [0, 1, 17, 64, 100]
    return [0, 1, 15, 16, 4097] + torch.randint(1, 8192, (59,)).tolist()


@pytest.mark.parametrize("num_kv_splits", [1, 3, None])
@pytest.mark.parametrize("idx64", [False, True], ids=["idx32", "idx64"])
def test_paged_decode_attention(dev: tuple[torch.device, torch.dtype], make_paged_kv: MakeKV,
                                num_kv_splits: int | None, idx64: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    device, dtype = dev
    monkeypatch.setattr(_utils, "needs_int64", lambda *t: idx64)  # exercise the huge-cache offset path
    for Hq, Hkv, D, bs in CPU_CASES if device.type == "cpu" else GPU_CASES:
        lens = _seq_lens(device)
        B = len(lens)
        k_cache, v_cache, tables = make_paged_kv(lens, Hkv, D, bs, dtype, device)
        # q as a strided view of a wider buffer, like a slice of the qkv projection.
        q = torch.randn(B, Hq + 1, D, device=device).to(dtype)[:, :Hq]
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
        scale = D**-0.5
        out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, scale, num_kv_splits)
        ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, scale, num_kv_splits)
        assert out.shape == (B, Hq, D) and out.dtype == dtype
        assert_close(out, ref, dtype)
        assert torch.equal(out[0], torch.zeros_like(out[0])), "seq_len 0 must give zeros"


@pytest.mark.parametrize("num_kv_splits", [1, 2])  # one split: stage 1 writes the output itself
def test_all_rows_empty(dev: tuple[torch.device, torch.dtype], make_paged_kv: MakeKV, num_kv_splits: int) -> None:
    """A fully padded CUDA-graph batch: every seq_len is 0 -> all zeros, no NaN."""
    device, dtype = dev
    k_cache, v_cache, tables = make_paged_kv([16, 16], 2, 64, 16, dtype, device)
    q = torch.randn(2, 4, 64, device=device).to(dtype)
    seq_lens = torch.zeros(2, dtype=torch.int32, device=device)
    out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.125, num_kv_splits)
    assert torch.equal(out, torch.zeros_like(out))


def test_large_logits_stable(dev: tuple[torch.device, torch.dtype], make_paged_kv: MakeKV) -> None:
    """Huge scores must not overflow the online softmax or the split merge."""
    device, dtype = dev
    lens = [40, 70]
    k_cache, v_cache, tables = make_paged_kv(lens, 1, 32, 16, dtype, device)
    q = (50 * torch.randn(2, 4, 32, device=device)).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 1.0, 3)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, 1.0)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("draw", range(3))
def test_random_lengths(dev: tuple[torch.device, torch.dtype], make_paged_kv: MakeKV, draw: int) -> None:
    device, dtype = dev
    cpu = device.type == "cpu"
    Hkv = int(torch.randint(1, 3 if cpu else 9, ()))
    group = int(torch.randint(1, 6, ()))
    D = 32 if cpu else 128
    bs = int(torch.tensor([8, 16, 32])[torch.randint(0, 3, ())])
    lens = torch.randint(0, 90 if cpu else 5000, (int(torch.randint(1, 6 if cpu else 100, ())),)).tolist()
    k_cache, v_cache, tables = make_paged_kv(lens, Hkv, D, bs, dtype, device, extra_cols=2)
    q = torch.randn(len(lens), Hkv * group, D, device=device).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    splits = int(torch.randint(1, 6, ()))
    out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.2, splits)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, 0.2)
    assert_close(out, ref, dtype)


def test_cuda_graph_replay(dev: tuple[torch.device, torch.dtype], make_paged_kv: MakeKV) -> None:
    """The launch depends only on shapes, so one captured graph serves any seq_lens."""
    device, dtype = dev
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    lens = [300, 1, 0, 4000]
    k_cache, v_cache, tables = make_paged_kv(lens, 8, 128, 16, dtype, device)
    q = torch.randn(len(lens), 32, 128, device=device).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.1)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.1)
    for new in ([17, 4000, 5, 0], [0, 0, 0, 0], [4000, 4000, 4000, 4000]):
        seq_lens.copy_(torch.tensor(new, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        assert_close(out, paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, 0.1), dtype)
