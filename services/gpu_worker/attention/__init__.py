"""Attention backends behind one interface: `torch` (reference, CPU) and `triton` (GPU)."""

from __future__ import annotations

import torch

from headrace.services.gpu_worker.attention.base import AttentionBackend


def make_backend(name: str, device: torch.device, block_size: int) -> AttentionBackend:
    """The backend for KV caches of `block_size`-token blocks; 'auto' picks triton on CUDA and torch elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_backend_available() else "torch"
    if name == "torch":
        from headrace.services.gpu_worker.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend(block_size)
    if name == "triton":
        from headrace.services.gpu_worker.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}")


def _triton_backend_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None and \
        importlib.util.find_spec("headrace.services.gpu_worker.attention.triton_backend") is not None
