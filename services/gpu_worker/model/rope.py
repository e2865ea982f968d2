"""Rotary position embeddings: the cos/sin table every layer reads, computed as transformers computes it."""

from __future__ import annotations

import torch

from headrace.common.models.arch import UnsupportedModelError

# Gemma 3 keys rope_parameters by layer type: global layers, then windowed ("local") layers.
_LAYER_TYPES = ("full_attention", "sliding_attention")


def rope_inv_freq(hf_config, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling exactly as transformers computes them (all rope types);
    `layer_type` picks one entry of per-layer-type rope_parameters (Gemma 3)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(hf_config, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
        return inv_freq, 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported")
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), **kwargs)
    return inv_freq, float(scaling)


def _table(hf_config, head_dim: int, max_positions: int, layer_type: str | None) -> torch.Tensor:
    inv_freq, scaling = rope_inv_freq(hf_config, head_dim, layer_type)
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)


def has_local_rope(hf_config) -> bool:
    """Whether rope_parameters holds one entry per layer type (Gemma 3's global and local bases)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    return all(isinstance(params.get(t), dict) for t in _LAYER_TYPES)


def rope_cos_sin_cache(hf_config, head_dim: int, max_positions: int, device: torch.device) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos in the first half, sin in the second (rotate-half layout).
    With per-layer-type RoPE (Gemma 3): [2, max_positions, head_dim], the global table then the local one
    (llama.layer_rope_table picks a layer's)."""
    if has_local_rope(hf_config):
        return torch.stack([_table(hf_config, head_dim, max_positions, t) for t in _LAYER_TYPES]).to(device)
    return _table(hf_config, head_dim, max_positions, None).to(device)
