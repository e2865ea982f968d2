"""Rotary position embeddings: the cos/sin table every layer reads, computed as transformers computes it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headrace.common.models.arch import ModelArch, UnsupportedModelError

# Gemma 3 keys rope_parameters by layer type: global layers, then windowed ("local") layers.
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class LongRopeRows:
    """LongRoPE's two tables in one cos/sin cache: rows [0, long_offset) hold the angles of the short factors,
    rows from long_offset those of the long ones. As in transformers, every token of a sequence longer than
    `original_max` uses the long factors, of a shorter one the short factors; a sequence that crosses while
    generating is recomputed with the long ones (batch_inputs.long_rope_restarts)."""

    original_max: int
    long_offset: int


def long_rope_rows(arch: ModelArch, max_positions: int) -> LongRopeRows | None:
    """The layout for a LongRoPE model that may run past its switch point; None where only the short factors
    can ever apply (no LongRoPE, or a context that never exceeds `original_max`)."""
    switch = arch.longrope_original_max
    if switch is None or max_positions <= switch:
        return None
    return LongRopeRows(original_max=switch, long_offset=max_positions)


def rope_inv_freq(hf_config, head_dim: int, seq_len: int | None = None,
                  layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling exactly as transformers computes them (all rope types);
    `seq_len` is the sequence length the length-dependent types (LongRoPE) choose by; `layer_type` picks one
    entry of per-layer-type rope_parameters (Gemma 3)."""
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
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), seq_len=seq_len, **kwargs)
    return inv_freq, float(scaling)


def _table(inv_freq: torch.Tensor, scaling: float, max_positions: int) -> torch.Tensor:
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)


def has_local_rope(hf_config) -> bool:
    """Whether rope_parameters holds one entry per layer type (Gemma 3's global and local bases)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    return all(isinstance(params.get(t), dict) for t in _LAYER_TYPES)


def rope_cos_sin_cache(hf_config, head_dim: int, max_positions: int, device: torch.device,
                       long_rope: LongRopeRows | None = None) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos in the first half, sin in the second (rotate-half layout).
    With `long_rope`, the long factors' table follows (2 * max_positions rows); LongRoPE's attention scaling
    is the same for both sets. With per-layer-type RoPE (Gemma 3): [2, max_positions, head_dim], the global
    table then the local one (llama.layer_rope_table picks a layer's)."""
    if has_local_rope(hf_config):
        return torch.stack([_table(*rope_inv_freq(hf_config, head_dim, layer_type=t), max_positions)
                            for t in _LAYER_TYPES]).to(device)
    cache = _table(*rope_inv_freq(hf_config, head_dim), max_positions)
    if long_rope is not None:
        long_freq, scaling = rope_inv_freq(hf_config, head_dim, seq_len=long_rope.original_max + 1)
        cache = torch.cat([cache, _table(long_freq, scaling, max_positions)])
    return cache.to(device)
