"""Write a dense weight as GPTQ or AWQ checkpoint tensors, following each format's own packing code
(AutoGPTQ's and AutoAWQ's `pack` loops, written out element by element here so the loaders are checked
against the formats and not against our own vectorised unpacking)."""

from __future__ import annotations

import numpy as np
import torch


def quantize_groups(w: torch.Tensor, bits: int, group_rows: np.ndarray, num_groups: int, symmetric: bool):
    """w [out, in] float32 -> (q [in, out] ints 0..2^bits-1, scales [groups, out], zeros [groups, out] ints),
    input row k quantized with group group_rows[k]'s scale and zero."""
    wt = w.t().double().numpy()  # [in, out]
    maxq = 2**bits - 1
    scales = np.zeros((num_groups, wt.shape[1]))
    zeros = np.zeros((num_groups, wt.shape[1]), dtype=np.int64)
    for g in range(num_groups):
        rows = wt[group_rows == g]
        lo, hi = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
        if symmetric:
            hi = np.maximum(np.abs(lo), hi)
            scales[g] = 2 * hi / maxq
            zeros[g] = (maxq + 1) // 2
        else:
            scales[g] = (hi - lo) / maxq
            zeros[g] = np.round(-lo / scales[g]).astype(np.int64)
    scales = scales.astype(np.float16).astype(np.float64)  # what the float16 checkpoint holds
    q = np.clip(np.round(wt / scales[group_rows]) + zeros[group_rows], 0, maxq).astype(np.int64)
    return q, scales, zeros


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ qweight: word [i, n] holds values [i * per + j, n] at bits j * bits."""
    per = 32 // bits
    out = np.zeros((values.shape[0] // per, values.shape[1]), dtype=np.uint32)
    for i in range(out.shape[0]):
        for j in range(per):
            out[i] |= (values[i * per + j].astype(np.uint32) << np.uint32(bits * j))
    return out.view(np.int32)


def _pack_cols(values: np.ndarray, bits: int, order: list[int]) -> np.ndarray:
    """Word [r, c] holds values [r, c * per + order[j]] at bits j * bits."""
    per = 32 // bits
    out = np.zeros((values.shape[0], values.shape[1] // per), dtype=np.uint32)
    for c in range(out.shape[1]):
        for j in range(per):
            out[:, c] |= values[:, c * per + order[j]].astype(np.uint32) << np.uint32(bits * j)
    return out.view(np.int32)


def gptq_tensors(w: torch.Tensor, bits: int, group: int, symmetric: bool, act_order_seed: int | None = None):
    """GPTQ (v1: zero points stored minus one) tensors of w [out, in]; with act_order_seed, groups are
    formed over a random permutation of the input rows (desc_act) and g_idx says which."""
    k = w.shape[1]
    rows = np.arange(k)
    if act_order_seed is not None:
        perm = np.random.default_rng(act_order_seed).permutation(k)
        g_idx = np.empty(k, dtype=np.int64)
        g_idx[perm] = np.arange(k) // group
    else:
        g_idx = rows // group
    q, scales, zeros = quantize_groups(w, bits, g_idx, k // group, symmetric)
    per = 32 // bits
    tensors = {"qweight": _pack_rows(q, bits), "qzeros": _pack_cols(zeros - 1, bits, list(range(per))),
               "scales": scales.astype(np.float16), "g_idx": g_idx.astype(np.int32)}
    dense = ((q - zeros[g_idx]) * scales[g_idx]).T  # [out, in]: what the checkpoint means
    return {name: torch.from_numpy(np.ascontiguousarray(t)) for name, t in tensors.items()}, torch.from_numpy(dense)


def awq_tensors(w: torch.Tensor, group: int):
    """AWQ GEMM tensors (4-bit, zero points, AutoAWQ's column order) of w [out, in]."""
    k = w.shape[1]
    g_idx = np.arange(k) // group
    q, scales, zeros = quantize_groups(w, 4, g_idx, k // group, symmetric=False)
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    tensors = {"qweight": _pack_cols(q, 4, order), "qzeros": _pack_cols(zeros, 4, order),
               "scales": scales.astype(np.float16)}
    dense = ((q - zeros[g_idx]) * scales[g_idx]).T
    return {name: torch.from_numpy(np.ascontiguousarray(t)) for name, t in tensors.items()}, torch.from_numpy(dense)
