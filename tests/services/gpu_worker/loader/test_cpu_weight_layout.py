"""On a CPU the attention projections and the LM head are stored K-major (faster single-row products);
the values and shapes stay those of the checkpoint."""

from __future__ import annotations

import torch

from headrace.services.gpu_worker.loader.model_loader import load_model
from headrace.common.models.source import resolve_model


def is_k_major(w: torch.Tensor) -> bool:
    return w.stride() == (1, w.shape[0])


def test_attention_projections_and_lm_head_are_k_major():
    source = resolve_model("random:tiny-llama", None)
    cpu = load_model(source, torch.device("cpu"), torch.float32, seed=3).model
    for layer in cpu.layers:
        assert is_k_major(layer.self_attn.qkv_proj.weight) and is_k_major(layer.self_attn.o_proj.weight)
        assert layer.mlp.gate_up_proj.weight.is_contiguous() and layer.mlp.down_proj.weight.is_contiguous()
    assert is_k_major(cpu.lm_head.weight)


def test_the_layout_changes_no_value_and_logits_agree():
    source = resolve_model("random:tiny-llama", None)
    relaid = load_model(source, torch.device("cpu"), torch.float32, seed=3).model
    plain = load_model(source, torch.device("cpu"), torch.float32, seed=3).model
    for m in plain.modules():  # undo the relayout: every weight contiguous [out, in] as loaded
        if hasattr(m, "weight") and isinstance(m.weight, torch.Tensor):
            m.weight.data = m.weight.data.contiguous()
    relaid_params, plain_params = dict(relaid.named_parameters()), dict(plain.named_parameters())
    assert relaid_params.keys() == plain_params.keys()
    for name, p in relaid_params.items():
        assert torch.equal(p, plain_params[name]), name
    x = torch.randn(1, relaid.arch.hidden_size)  # a single row: the case the layout is for
    torch.testing.assert_close(relaid.compute_logits(x), plain.compute_logits(x), rtol=1e-5, atol=1e-5)
