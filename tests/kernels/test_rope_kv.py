from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from .kernel_testing import assert_close  # noqa: E402
from headrace.kernels.rope_kv import rope_and_cache, rope_and_cache_ref  # noqa: E402


def _cos_sin_cache(max_pos: int, head_dim: int, device: torch.device) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    freqs = torch.arange(max_pos, device=device).float()[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


@pytest.mark.parametrize("head_dim", [64, 48])  # 48: half (24) not a power of two
def test_rope_and_cache(dev: tuple[torch.device, torch.dtype], head_dim: int) -> None:
    device, dtype = dev
    T, Hq, Hkv, bs = (9, 6, 2, 16) if device.type == "cpu" else (300, 32, 8, 16)
    head_dim = head_dim if device.type == "cpu" else 2 * head_dim
    num_blocks = T // bs + 4
    # qkv from one fused projection: q/k/v are strided views, like in the model.
    qkv = torch.randn(T, (Hq + 2 * Hkv) * head_dim, device=device).to(dtype)
    q, k, v = qkv.split([Hq * head_dim, Hkv * head_dim, Hkv * head_dim], dim=-1)
    q, k, v = q.view(T, Hq, head_dim), k.view(T, Hkv, head_dim), v.view(T, Hkv, head_dim)
    positions = torch.randint(0, 4096, (T,), device=device)
    slots = torch.randperm(num_blocks * bs, device=device)[:T]
    slots[torch.rand(T, device=device) < 0.2] = -1  # padding entries: must not be written
    cache = _cos_sin_cache(4096, head_dim, device)
    k_cache = torch.randn(num_blocks, bs, Hkv, head_dim, device=device).to(dtype)
    v_cache = torch.randn_like(k_cache)

    q2, k2, v2, kc2, vc2 = q.clone(), k.clone(), v.clone(), k_cache.clone(), v_cache.clone()
    rope_and_cache_ref(q2, k2, v2, positions, cache, kc2, vc2, slots)
    rq, rk = rope_and_cache(q, k, v, positions, cache, k_cache, v_cache, slots)

    assert rq.data_ptr() == q.data_ptr() and rk.data_ptr() == k.data_ptr()  # in place
    assert_close(q, q2, dtype)
    assert_close(k, k2, dtype)
    assert torch.equal(v, v2)
    assert_close(k_cache, kc2, dtype)
    assert torch.equal(v_cache, vc2)  # v is copied bit-exactly, skipped slots untouched


def test_reference_matches_hf_rotate_half() -> None:
    """Pin the convention: HF Llama's q*cos + rotate_half(q)*sin with duplicated cos/sin."""
    T, H, D = 5, 3, 16
    q, k, v = torch.randn(T, H, D), torch.randn(T, H, D), torch.randn(T, H, D)
    positions = torch.tensor([0, 1, 7, 100, 3])
    cache = _cos_sin_cache(128, D, torch.device("cpu"))
    cos = torch.cat([cache[positions, : D // 2]] * 2, dim=-1)[:, None]
    sin = torch.cat([cache[positions, D // 2 :]] * 2, dim=-1)[:, None]

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x[..., D // 2 :], x[..., : D // 2]], dim=-1)

    q_hf, k_hf = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    kc, vc = torch.zeros(2, 16, H, D), torch.zeros(2, 16, H, D)
    rope_and_cache_ref(q, k, v, positions, cache, kc, vc, torch.arange(T))
    torch.testing.assert_close(q, q_hf)
    torch.testing.assert_close(k, k_hf)
    torch.testing.assert_close(kc[0, :T], k_hf)
