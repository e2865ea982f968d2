"""The fused MoE kernel against its torch reference, on fresh random routings (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from .kernel_testing import assert_close  # noqa: E402
from headrace.kernels.fused_moe import (  # noqa: E402
    MoeConfig,
    align_by_expert,
    align_by_expert_kernel,
    block_n_for,
    default_config,
    fused_moe,
    launch_variants,
    max_padded_rows,
)
from headrace.kernels.fused_moe_ref import fused_moe_reference  # noqa: E402


def random_routing(num_tokens: int, num_experts: int, top_k: int, device: torch.device):
    """Distinct experts per token (as top-k gives), weights from a softmax, float32."""
    ids = torch.rand(num_tokens, num_experts, device=device).argsort(dim=1)[:, :top_k]
    weights = torch.rand(num_tokens, top_k, device=device).softmax(dim=1)
    return weights, ids


def test_alignment_groups_pairs_by_expert_in_padded_blocks():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [3, 2]])
    sorted_pairs, block_experts, num_padded = align_by_expert(ids, 5, 4)
    n = ids.numel()
    assert sorted_pairs.numel() == max_padded_rows(n, 5, 4) and sorted_pairs.numel() % 4 == 0
    # expert 0: pairs 1, 4 | expert 1: pair 3 | expert 2: pairs 0, 2, 5, 7 | expert 3: pair 6; expert 4 none
    want = [1, 4, n, n] + [3, n, n, n] + [0, 2, 5, 7] + [6, n, n, n]
    assert int(num_padded) == 16
    assert sorted_pairs[:16].tolist() == want
    assert block_experts[:4].tolist() == [0, 1, 2, 3]
    assert (sorted_pairs[16:] == n).all()


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m", [(1, 8, 2, 16), (64, 8, 2, 32), (5, 128, 8, 16),
                                                                  (300, 6, 3, 16), (4, 3, 3, 64), (200, 128, 4, 16)])
def test_one_launch_alignment_equals_the_device_ops(dev, num_tokens, num_experts, top_k, block_m):
    device, _ = dev
    _, ids = random_routing(num_tokens, num_experts, top_k, device)
    for got, want in zip(align_by_expert_kernel(ids, num_experts, block_m), align_by_expert(ids, num_experts, block_m)):
        assert torch.equal(got.cpu(), want.cpu())


def test_reference_is_the_per_token_sum_over_its_experts():
    x, w13, w2 = torch.randn(5, 8), torch.randn(4, 12, 8), torch.randn(4, 8, 6)
    weights, ids = random_routing(5, 4, 2, torch.device("cpu"))
    want = torch.zeros(5, 8)
    for t in range(5):
        for j in range(2):
            e = int(ids[t, j])
            h = w13[e] @ x[t]
            want[t] += weights[t, j] * (w2[e] @ (torch.nn.functional.silu(h[:6]) * h[6:]))
    torch.testing.assert_close(fused_moe_reference(x, w13, w2, weights, ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_tokens,num_experts,top_k,hidden,inter", [
    (1, 4, 2, 32, 48), (7, 8, 2, 48, 40), (33, 8, 3, 64, 24), (20, 3, 3, 16, 16),
])
def test_fused_moe_matches_reference(dev, num_tokens, num_experts, top_k, hidden, inter):
    device, dtype = dev
    x = torch.randn(num_tokens, hidden, device=device).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device=device) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, device=device) / inter ** 0.5).to(dtype)
    weights, ids = random_routing(num_tokens, num_experts, top_k, device)
    want = fused_moe_reference(x, w13, w2, weights, ids)
    for cfg in (MoeConfig(16, 16, 16, 4, 1), MoeConfig(32, 32, 32, 4, 1)):  # K and N tails, several row blocks
        assert_close(fused_moe(x, w13, w2, weights, ids, cfg), want, dtype)


def test_block_size_grows_with_the_rows_per_expert():
    decode, prefill = default_config(1, 2, 8), default_config(1024, 2, 8)
    assert decode.block_m == 16 and prefill.block_m == 128
    assert default_config(64, 2, 8).block_m == 32  # Mixtral at batch 64: ~16 rows per expert, up to ~24


def test_narrow_outputs_of_few_experts_get_narrower_column_tiles():
    # Mixtral at batch 1 on 132 SMs: gate|up (2 experts x 14336 / 64 = 448 programs) keeps 64 columns, down
    # (2 x 4096 / 64 = 128 programs) halves to 16; at batch 64 (12 busy row blocks) down keeps 64.
    assert block_n_for(14336, 2, 64, 132) == 64
    assert block_n_for(4096, 2, 64, 132) == 16
    assert block_n_for(4096, 12, 64, 132) == 64
    assert block_n_for(768, 8, 64, 132) == 16  # Qwen3-MoE's gate|up at batch 1


def test_launch_variants_name_each_variant_once_with_its_smallest_batch():
    # Mixtral (top 2 of 8): BLOCK_M 16 up to 42 tokens, 32 from 43, 64 from 86, 128 from 171; beyond 512 tokens
    # (1,024 pairs) the alignment is the device ops'.
    variants = launch_variants(600, 2, 8, 14336, 4096, torch.device("cpu"))
    assert sorted((cfg.block_m, one_launch, tokens) for (cfg, _, _, one_launch), tokens in variants.items()) == [
        (16, True, 1), (32, True, 43), (64, True, 86), (128, False, 513), (128, True, 171)]
