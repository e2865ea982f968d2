"""Small helpers shared by the Triton kernel wrappers."""

from __future__ import annotations

import functools
import os

import torch

# Tests flip this to True so wrapper-allocated buffers start as NaN: any element a kernel
# forgets to write then shows up as a mismatch instead of silently passing.
POISON_EMPTY: bool = False


def interpret_mode() -> bool:
    """True when Triton kernels run in the (CPU) interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def can_run_triton(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run for tensors on `device` (default: any device)."""
    if not triton_importable():
        return False
    if interpret_mode():
        return True
    if device is not None and torch.device(device).type != "cuda":
        return False
    return torch.cuda.is_available()


def empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, NaN-filled when POISON_EMPTY is set (floating dtypes only)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_EMPTY and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def num_sms(device: torch.device) -> int:
    """Streaming-multiprocessor count of a CUDA device (cached: called on every launch)."""
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def shared_memory_per_block(device: torch.device) -> int:
    """Bytes of shared memory one block may opt into on a CUDA device (cached)."""
    return _shared_memory(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _shared_memory(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or getattr(props, "shared_memory_per_block", 0))


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether an element offset into any of `tensors` can reach 2**31 (else kernels use cheaper int32 math)."""
    return any(sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) >= 2**31 - 1 for t in tensors)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
