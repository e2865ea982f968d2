"""The FP8 KV cache's number format, in torch: K and V stored as float8_e4m3fn, each divided by a per-tensor
scale on the write and multiplied by it (in float32) on the read. The torch attention backend runs these; the
Triton kernels do the same arithmetic inside their loads and stores (rope_kv, paged_decode_attention,
prefill_attention), and their tests compare against these.

The scales are one float per layer for K and one for V: a checkpoint's calibrated `k_scale` / `v_scale`
where it has them, else 1.0 (vLLM's default too), which keeps values up to +-448 -- ample for keys and
values of normalised hidden states, but no calibration. Values beyond the format's range saturate at +-448
(a plain cast would turn them into NaN: e4m3fn has no infinity).
"""

from __future__ import annotations

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_KV_DTYPE).max)  # 448


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_KV_DTYPE


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale, saturated to the format's range, rounded to e4m3 (round to nearest even), in float32."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def dequantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 values of a stored fp8 tensor: element times scale."""
    return x.float() * scale


def store_dtype_view(cache: torch.Tensor) -> torch.Tensor:
    """A cache view that index_copy_ / index_select accept on every device: fp8 as its bytes (CPU torch has
    no fp8 indexing kernels), other dtypes as they are."""
    return cache.view(torch.uint8) if is_fp8(cache.dtype) else cache
