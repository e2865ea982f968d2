from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from .kernel_testing import assert_close  # noqa: E402
from headrace.kernels import _utils  # noqa: E402
from headrace.kernels.w4a16_matmul import (  # noqa: E402
    W4A16Config,
    default_config,
    dequantize,
    pack,
    unpack,
    w4a16_matmul,
    w4a16_matmul_reference,
)

# (N, K) and explicit configs: small blocks on the CPU interpreter. N = 48 is ragged for BLOCK_N = 32; the skinny
# configs cover no split, uneven splits (4 K tiles in 3 splits: 2 + 2 + 0, an empty split) and a split per tile;
# the GEMM ones a ragged last row block (M = 17, 40 over BLOCK_M = 16 / 32), without and with split-K.
_CPU_SHAPE = (48, 128)
_CPU_SKINNY = [(16, 32, 32, 1, 4, 2), (16, 16, 32, 3, 4, 2), (16, 32, 32, 4, 4, 2)]
_CPU_GEMM = [(16, 32, 32, 1, 4, 2), (32, 16, 32, 1, 4, 2), (16, 32, 32, 3, 4, 2)]
# The elementwise GEMV (block_m < 16, M <= block_m): no split, and 3 splits of 4 tiles (one empty).
_CPU_GEMV = [(1, 32, 32, 1, 4, 1), (1, 16, 32, 3, 4, 1)]
_GPU_SHAPES = [(6144, 4096), (4096, 14336), (1000, 1024)]


def _inputs(M: int, N: int, K: int, G: int, dtype: torch.dtype, device: torch.device, row_pad: int = 0):
    """x (optionally a view with row stride K + row_pad), q [K, N] nibbles, scales ~ 1 / (8 sqrt(K)) so that y is
    of order 1, asymmetric integer zeros 0..15, bias."""
    x = torch.randn(M, K + row_pad, device=device).to(dtype)[:, :K]
    q = torch.randint(0, 16, (K, N), device=device, dtype=torch.int32)
    scales = ((0.5 + torch.rand(K // G, N, device=device)) / (8 * K**0.5)).to(dtype)
    zeros = torch.randint(0, 16, (K // G, N), device=device).to(dtype)
    bias = torch.randn(N, device=device).to(dtype)
    return x, q, scales, zeros, bias


def _dtypes(dtype: torch.dtype) -> list[torch.dtype]:
    """The fixture's dtype (fp32 under the interpreter, bf16 on a GPU) and float16. The interpreter runs float16
    (numpy has it) but not bfloat16: it keeps bfloat16 as raw uint16 bits, which its tl.dot multiplies as
    integers, so bfloat16 is covered on a GPU only."""
    return [dtype, torch.float16]


def _configs(M: int, device: torch.device) -> list:
    if device.type != "cpu":
        return [None] + ([(1, 128, 32, 4, 4, 2)] if M == 1 else [])
    return _CPU_SKINNY + (_CPU_GEMV if M == 1 else []) if M <= 16 else _CPU_GEMM


def _fits(cfg, G: int, K: int) -> bool:
    """A config's K tile must lie inside one group (or the one group spans K)."""
    return cfg is None or G % cfg[2] == 0 or G == K


def test_pack_nibble_order() -> None:
    """k = 0 is the lowest nibble of word 0; k = 7 the highest (the word's sign bit); column n is word column n."""
    q = torch.zeros(16, 2, dtype=torch.int32)
    q[:8, 0] = torch.arange(1, 9)  # 1..8 for k = 0..7
    q[7, 1] = 0xF  # only the top nibble: the int32 is negative
    q[8, 1] = 0x3  # k = 8: lowest nibble of word 1
    words = pack(q)
    assert words.dtype == torch.int32 and words.shape == (2, 2)
    assert words[0, 0].item() == 0x87654321 - 2**32
    assert words[0, 1].item() == 0xF0000000 - 2**32
    assert words[1].tolist() == [0, 3]
    assert torch.equal(unpack(words), q)


def test_pack_dequantize_round_trip() -> None:
    K, N, G = 64, 5, 32
    q = torch.randint(0, 16, (K, N))
    assert torch.equal(unpack(pack(q)), q.to(torch.int32))
    scales = torch.rand(K // G, N) + 0.5
    zeros = torch.randint(0, 16, (K // G, N)).float()
    zeros[1, 2] = 7.5  # a fractional zero point is allowed
    w = dequantize(pack(q), scales, zeros, G)
    want = (q.float() - zeros.repeat_interleave(G, 0)) * scales.repeat_interleave(G, 0)
    assert w.dtype == torch.float32 and torch.equal(w, want)
    assert dequantize(pack(q), scales.half(), zeros.half(), G).dtype == torch.float16
    x = torch.randn(3, K)
    torch.testing.assert_close(w4a16_matmul_reference(x, pack(q), scales, zeros, G), x @ want)


@pytest.mark.parametrize("M", [1, 3, 16, 17, 40])
def test_w4a16_matmul(dev: tuple[torch.device, torch.dtype], M: int) -> None:
    """Both kernels against the fp32 reference: group sizes 32, 64 and K, every test config with a bias, the
    first without."""
    device, base = dev
    shapes = [_CPU_SHAPE] if device.type == "cpu" else _GPU_SHAPES
    for dtype in _dtypes(base):
        for N, K in shapes:
            for G in (32, 64, K):
                x, q, scales, zeros, bias = _inputs(M, N, K, G, dtype, device)
                qweight = pack(q)
                for i, cfg in enumerate(c for c in _configs(M, device) if _fits(c, G, K)):
                    for b in (None, bias) if i == 0 else (bias,):
                        y = w4a16_matmul(x, qweight, scales, zeros, G, b, cfg)
                        assert y.shape == (M, N) and y.dtype == dtype
                        assert_close(y, w4a16_matmul_reference(x, qweight, scales, zeros, G, b), dtype)


@pytest.mark.parametrize("M", [5, 33])
def test_w4a16_matmul_strided_rows(dev: tuple[torch.device, torch.dtype], M: int) -> None:
    """x a view whose row stride exceeds K (e.g. a slice of a fused activation), both kernels."""
    device, dtype = dev
    N, K = (40, 96) if device.type == "cpu" else (4096, 4096)
    G = 32
    x, q, scales, zeros, bias = _inputs(M, N, K, G, dtype, device, row_pad=40)
    assert x.stride(0) == K + 40
    qweight = pack(q)
    want = w4a16_matmul_reference(x, qweight, scales, zeros, G, bias)
    cfgs = [c for c in _configs(M, device) if _fits(c, G, K)] + [None]
    for cfg in cfgs:
        assert_close(w4a16_matmul(x, qweight, scales, zeros, G, bias, cfg), want, dtype)


def test_w4a16_matmul_one_ragged_group(dev: tuple[torch.device, torch.dtype]) -> None:
    """G == K with K not a multiple of BLOCK_K: the last tile is masked (the only case where tiles are ragged)."""
    device, dtype = dev
    N, K = (24, 80) if device.type == "cpu" else (1000, 4104)
    for M, cfg in ((2, (16, 16, 32, 2, 4, 2)), (20, (16, 16, 32, 1, 4, 2))):
        x, q, scales, zeros, bias = _inputs(M, N, K, K, dtype, device)
        qweight = pack(q)
        want = w4a16_matmul_reference(x, qweight, scales, zeros, K, bias)
        for c in (cfg, None):
            assert_close(w4a16_matmul(x, qweight, scales, zeros, K, bias, c), want, dtype)


def test_w4a16_matmul_deterministic_and_empty(dev: tuple[torch.device, torch.dtype]) -> None:
    device, dtype = dev
    N, K = (40, 256) if device.type == "cpu" else (4096, 14336)
    x, q, scales, zeros, bias = _inputs(3, N, K, 64, dtype, device)
    qweight = pack(q)
    cfg = (16, 16, 32, 4, 4, 2) if device.type == "cpu" else None
    assert torch.equal(w4a16_matmul(x, qweight, scales, zeros, 64, bias, cfg),
                       w4a16_matmul(x, qweight, scales, zeros, 64, bias, cfg))
    assert w4a16_matmul(x[:0], qweight, scales, zeros, 64, bias).shape == (0, N)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter compiles nothing")
def test_no_batch_size_compiles_a_variant_of_its_own() -> None:
    """After one call on each path (with and without split-K), no M in 1..300 compiles anything: M, the GEMM's
    split count and its partials' stride are runtime arguments, never specialised on."""
    from headrace.kernels.compile_watch import watch_compiles

    device, dtype = torch.device("cuda"), torch.bfloat16
    N, K, G = 4096, 4096, 128
    x, q, scales, zeros, bias = _inputs(300, N, K, G, dtype, device)
    qweight = pack(q)
    for M in (1, 17, 1024):  # skinny (split), GEMM (split), GEMM (none)
        w4a16_matmul(x.repeat(4, 1)[:M], qweight, scales, zeros, G, bias)
    compiles: list[str] = []
    if not watch_compiles(compiles.append):
        pytest.skip("this Triton has no compile hook")
    try:
        for M in range(1, 301):
            w4a16_matmul(x[:M], qweight, scales, zeros, G, bias)
        torch.cuda.synchronize()
    finally:
        import triton

        triton.knobs.runtime.jit_cache_hook = None
    assert compiles == []


def test_default_config_llama3_8b(monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy on an H200 (132 SMs) for Llama-3-8B's layers at group size 128: one skinny config for every
    M <= 16 (>= 4 programs per SM unless splits would drop below 32 KiB); for M > 16 one set of GEMM constexprs,
    only the (runtime) split count following M until the grid covers the SMs."""
    monkeypatch.setattr(_utils, "num_sms", lambda device: 132)
    cuda = torch.device("cuda", 0)
    want = {  # (N, K): skinny (BLOCK_N, BLOCK_K, SPLIT_K), GEMM splits at M = 17, 64, 256, 8192
        (6144, 4096): ((128, 128, 8), (4, 4, 1, 1)),     # QKV: 48 N-blocks x 8 = 384 programs (16: 2 tiles each)
        (4096, 4096): ((128, 128, 8), (8, 8, 2, 1)),     # o_proj: 32 x 8 = 256 programs of 4 tiles
        (28672, 4096): ((128, 128, 4), (1, 1, 1, 1)),    # gate_up: 224 x 4 = 896 programs
        (4096, 14336): ((128, 128, 16), (8, 8, 2, 1)),   # down: 32 x 16 = 512 programs of 7 tiles
    }
    for (N, K), ((bn, bk, split), gemm_splits) in want.items():
        skinny = {default_config(M, N, K, 128, cuda) for M in (2, 7, 16)}
        assert skinny == {W4A16Config(16, bn, bk, split, 8, 4)}, (N, K, skinny)
        gemm = [default_config(M, N, K, 128, cuda) for M in (17, 64, 256, 8192)]
        assert {c._replace(split_k=0) for c in gemm} == {W4A16Config(64, 128, 64, 0, 4, 4)}, gemm
        assert tuple(c.split_k for c in gemm) == gemm_splits, (N, K, gemm)
    # M = 1 takes the GEMV, split until the grid has >= 512 programs (at most 16, >= 4 tiles a split).
    gemv = {(N, K): default_config(1, N, K, 128, cuda) for N, K in want}
    assert gemv == {(6144, 4096): W4A16Config(1, 128, 128, 16, 4, 2), (4096, 4096): W4A16Config(1, 128, 128, 16, 4, 2),
                    (28672, 4096): W4A16Config(1, 128, 128, 4, 4, 2),
                    (4096, 14336): W4A16Config(1, 128, 128, 16, 4, 2)}, gemv
    # Tiles never cross a group; one group per column takes any K.
    assert default_config(2, 4096, 4096, 32, cuda).block_k == 32
    assert default_config(64, 4096, 4096, 32, cuda).block_k == 32
    assert default_config(2, 4096, 4104, 4104, cuda).block_k == 128
    assert default_config(1, 4096, 4104, 4104, cuda).block_m == 16  # a ragged K stays on the padded-dot path
