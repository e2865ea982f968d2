"""The per-layer K and V scales of an fp8 KV cache, as checkpoints spell them.

Calibrated checkpoints carry one float per layer for K and one for V: llm-compressor / compressed-tensors
(`kv_cache_scheme`) write `self_attn.k_scale` / `self_attn.v_scale` (older versions
`self_attn.k_proj.output_scale` / `v_proj.output_scale`), HF / ModelOpt fp8 checkpoints the same names, and
older ones a single `self_attn.kv_scale` for both. A layer without them keeps 1.0, as vLLM does. Query and
attention-probability scales (for fp8 attention math, which this engine does not do) are read and dropped.
The scales are used only with `--kv-cache-dtype fp8`; with a 16-bit cache they are loaded and unused.
"""

from __future__ import annotations

import re
from typing import Any

import torch

_KV_SCALE = re.compile(r"^layers\.(\d+)\.self_attn\.(?:attn\.)?(?:(k|v|kv)_scale|(k|v)_proj\.output_scale)$")
_UNUSED_SCALE = re.compile(r"^layers\.\d+\.self_attn\.(?:attn\.)?(?:q_scale|prob_scale|q_proj\.output_scale)$")


def kv_scale_checkpoint_name(name: str) -> tuple[int, str] | None:
    """(layer, "k" | "v" | "kv") for a KV-cache scale's name (without the "model." prefix); (-1, "") for a
    scale this engine does not use; None for any other tensor."""
    m = _KV_SCALE.match(name)
    if m:
        return int(m.group(1)), m.group(2) or m.group(3)
    if _UNUSED_SCALE.match(name):
        return -1, ""
    return None


def scale_value(loaded: Any) -> float:
    """One float from a checkpoint's scale (a torch tensor or a lazy safetensors slice, shape [] or [n]: the
    largest, as a per-tensor scale must cover every part)."""
    if not isinstance(loaded, torch.Tensor):
        loaded = torch.as_tensor(loaded[:] if loaded.get_shape() else loaded[()])
    value = float(loaded.float().max())
    if not value > 0.0 or value != value or value == float("inf"):
        raise ValueError(f"a KV-cache scale must be a positive finite number, got {value}")
    return value


def set_kv_scale(current: tuple[float, float], which: str, value: float) -> tuple[float, float]:
    """The layer's (k, v) scales after one checkpoint tensor: kv_scale sets both."""
    k, v = current
    if which in ("k", "kv"):
        k = value
    if which in ("v", "kv"):
        v = value
    return k, v
