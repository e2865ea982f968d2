"""The torch reference of the fused MoE kernel (kernels/fused_moe.py), and the path CPUs run.

Pure torch, so CPU processes never import Triton. It loops over the experts the batch routes to, which
makes its shapes data-dependent (a host sync per step): fine on a CPU, never on a captured GPU path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(gate_e x[t]) * up_e x[t]), e = topk_ids[t, j].

    x [T, H]; w13 [E, 2I, H], expert e's gate rows then its up rows; w2 [E, H, I]; topk_weights [T, k]
    (float32), topk_ids [T, k]. Each expert's weighted output is accumulated in float32; [T, H] in x's dtype."""
    num_tokens, top_k = topk_ids.shape
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    flat_ids, flat_weights = topk_ids.flatten(), topk_weights.flatten().float()
    for expert in flat_ids.unique().tolist():
        pairs = (flat_ids == expert).nonzero().squeeze(1)
        tokens = pairs // top_k
        gate, up = F.linear(x[tokens], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert])
        out.index_add_(0, tokens, y.float() * flat_weights[pairs, None])
    return out.to(x.dtype)
