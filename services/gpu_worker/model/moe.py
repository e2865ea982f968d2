"""The mixture-of-experts block that replaces a decoder layer's MLP (Mixtral, Qwen2-MoE, Qwen3-MoE).

A router scores every expert per token; each token runs its top-k experts' SwiGLU MLPs and sums their
outputs weighted by the softmax scores (renormalised over the top k where the family does). Qwen2-MoE adds
a shared expert every token runs, scaled by sigmoid of its own one-row gate. The experts' weights are
stacked per layer, gate|up as [E, 2I, H] and down as [E, H, I] (transformers' own in-memory layout), so
one fused kernel (kernels/fused_moe.py) runs all of them. Under tensor parallelism every rank holds every
expert's slice of the intermediate dimension, like the dense MLP, and routes identically (the router is
replicated); the experts' and the shared expert's partial sums are all-reduced once.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from headrace.common.models.arch import ModelArch
from headrace.services.gpu_worker.model.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    _copy_into,
    default_weight_loader,
    silu_and_mul,
)
from headrace.services.gpu_worker.parallel import TPGroup

# One expert's tensor in a checkpoint: Mixtral's w1 (gate), w3 (up), w2 (down) under block_sparse_moe, or
# Qwen's gate_proj / up_proj / down_proj under mlp.
_EXPERT = re.compile(r"(layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w3|w2|gate_proj|up_proj|down_proj)"
                     r"\.weight")
_PART = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1, "w2": 2, "down_proj": 2}


def moe_checkpoint_name(name: str) -> tuple[str, Any] | None:
    """Our parameter and shard for a checkpoint tensor of an MoE block (name without the `model.` prefix),
    or None for any other tensor. A per-expert tensor lands in its layer's stack with shard (expert, part);
    transformers 5's stacked tensors (`mlp.experts.gate_up_proj`) and the router load whole."""
    match = _EXPERT.fullmatch(name)
    if match:
        layer, expert, part = match.groups()
        stack = "down_proj" if _PART[part] == 2 else "gate_up_proj"
        return f"{layer}.mlp.experts.{stack}", (int(expert), _PART[part])
    if ".block_sparse_moe." in name:  # Mixtral's router
        return name.replace(".block_sparse_moe.", ".mlp."), None
    return None


class Router(nn.Module):
    """Top-k softmax routing; the [E, H] weight is replicated on every rank."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.top_k, self.renormalize = arch.num_experts_per_tok, arch.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(arch.num_experts, arch.hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] float32, expert ids [T, k]); probabilities in float32 as transformers takes them."""
        probs = torch.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids


class Experts(nn.Module):
    """Every expert's weights, this rank's slice of each intermediate dimension: gate_up_proj
    [E, 2 * I_local, H] (this rank's gate rows, then its up rows), down_proj [E, H, I_local]."""

    def __init__(self, arch: ModelArch, tp: TPGroup, dtype: torch.dtype, device: torch.device):
        super().__init__()
        inter, e, h = arch.moe_intermediate_size, arch.num_experts, arch.hidden_size
        self.top_k = arch.num_experts_per_tok
        if inter % tp.size:
            raise ValueError(f"the experts' intermediate size {inter} is not divisible by tensor-parallel size "
                             f"{tp.size}")
        self.inter, self.local = inter, inter // tp.size
        self.start = tp.rank * self.local
        self.gate_up_proj = self._param((e, 2 * self.local, h), dtype, device)
        self.down_proj = self._param((e, h, self.local), dtype, device)

    def _param(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
        param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
        param.weight_loader = self.weight_loader
        param.expert_stack = True  # a step reads only the experts its tokens route to (bench/roofline.py)
        return param

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard: tuple[int, int] | None = None) -> None:
        """A whole stack ([E, 2I, H] or [E, H, I]; shard None) or one expert's gate, up or down (shard
        (expert, part)); reads only this rank's rows (gate, up) or columns (down)."""
        rows = slice(self.start, self.start + self.local)
        if param is self.down_proj:
            src, dst = (loaded[:, :, rows], param.data) if shard is None else (loaded[:, rows], param.data[shard[0]])
            _copy_into(dst, src)
            return
        if shard is None:
            up_rows = slice(self.inter + self.start, self.inter + self.start + self.local)
            _copy_into(param.data[:, : self.local], loaded[:, rows])
            _copy_into(param.data[:, self.local :], loaded[:, up_rows])
            return
        expert, part = shard
        _copy_into(param.data[expert, part * self.local : (part + 1) * self.local], loaded[rows])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of the routed experts' outputs, [T, H]."""
        if use_fused_kernel(x):
            from headrace.kernels.fused_moe import fused_moe

            return fused_moe(x, self.gate_up_proj, self.down_proj, weights, ids)
        from headrace.kernels.fused_moe_ref import fused_moe_reference

        return fused_moe_reference(x, self.gate_up_proj, self.down_proj, weights, ids)


def warm_up_fused_kernel(experts: Experts, max_tokens: int) -> int:
    """Run the fused kernel once per variant it can launch for up to max_tokens tokens (each layer has the
    same shapes, so one block's experts suffice); returns the number of variants compiled."""
    from headrace.kernels.fused_moe import fused_moe, launch_variants

    w13, w2 = experts.gate_up_proj, experts.down_proj
    num_experts, hidden, top_k = w13.shape[0], w13.shape[2], experts.top_k
    variants = launch_variants(max_tokens, top_k, num_experts, w2.shape[2], hidden, w13.device)
    for tokens in variants.values():
        x = torch.zeros(tokens, hidden, dtype=w13.dtype, device=w13.device)
        ids = (torch.arange(tokens * top_k, device=w13.device) % num_experts).view(tokens, top_k)
        fused_moe(x, w13, w2, torch.full((tokens, top_k), 1.0 / top_k, device=w13.device), ids)
    return len(variants)


def use_fused_kernel(x: torch.Tensor) -> bool:
    """The Triton kernel on CUDA (graph-safe: no host sync); the torch reference elsewhere."""
    return x.is_cuda and _triton_importable()


@functools.cache
def _triton_importable() -> bool:
    """Checked on first CUDA use only: CPU processes never load Triton."""
    from headrace.kernels._utils import triton_importable

    return triton_importable()


class ReplicatedLinear(nn.Module):
    """y = x W^T with the whole [out, in] weight on every rank (the shared expert's one-row gate)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class SharedExpert(nn.Module):
    """Qwen2-MoE's shared expert: a SwiGLU MLP every token runs, returning this rank's partial sum."""

    def __init__(self, arch: ModelArch, tp: TPGroup, dtype: torch.dtype, device: torch.device):
        super().__init__()
        i = arch.shared_expert_intermediate_size
        self.gate_up_proj = ColumnParallelLinear(arch.hidden_size, [i, i], False, tp, dtype, device)
        self.down_proj = RowParallelLinear(i, arch.hidden_size, False, tp, dtype, device, reduce_results=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class MoEBlock(nn.Module):
    """Router, experts and (Qwen2-MoE) the gated shared expert; one all-reduce for all of them."""

    def __init__(self, arch: ModelArch, tp: TPGroup, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.tp = tp
        self.gate = Router(arch, dtype, device)
        self.experts = Experts(arch, tp, dtype, device)
        self.shared_expert = self.shared_expert_gate = None
        if arch.shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(arch, tp, dtype, device)
            self.shared_expert_gate = ReplicatedLinear(arch.hidden_size, 1, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            # sigmoid(gate) is the same on every rank, so scaling each rank's partial sum scales the total.
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.tp.all_reduce(out)
