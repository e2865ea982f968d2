"""MoE under tensor parallelism on CPU (gloo): experts split along their intermediate dimension, the shared
expert too, one all-reduce per block; the greedy tokens of TP=2 equal TP=1's."""

from __future__ import annotations

from tests.services.gpu_worker.test_tensor_parallel import NEW_TOKENS, run_tp


def test_qwen2_moe_tp2_matches_single_rank():
    single = run_tp("random:tiny-qwen2-moe", 1)[0][0]
    sharded = run_tp("random:tiny-qwen2-moe", 2)
    assert sharded[0][0] == single
    assert all(len(o) == NEW_TOKENS for o in single)
