"""GGUF quantized blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K) read into one affine group form, without dequantizing:

    codes   uint8   [rows, cols]        the stored integer of each weight, made unsigned
    scales  float32 [rows, cols / 16]   one per 16 weights along a row
    mins    float32 [rows, cols / 16]
    w[r, c] = codes[r, c] * scales[r, c // 16] + mins[r, c // 16]

Every format's own formula is this one with its numbers folded in (Q4_0: d * (q - 8) -> scale d, min -8d;
Q4_K: d * sc * q - dmin * m -> scale d * sc, min -dmin * m; Q6_K: d * sc * (q - 32) -> min -32 * d * sc), and
each folded number is exact in float32 (an fp16 times a 6- or 8-bit integer), so `codes * scales + mins`
equals gguf's own `dequantize` bit for bit (tests/models/test_gguf_blocks.py). Groups are stored per 16
weights, the finest any of these formats uses (Q6_K); the 32-weight formats repeat each scale twice.
"""

from __future__ import annotations

import numpy as np

GROUP = 16  # weights per stored scale/min
QK_K = 256  # weights per K-quant super-block
# name -> (weights per block, bytes per block)
FORMATS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34), "Q4_K": (QK_K, 144), "Q6_K": (QK_K, 210)}


class UnsupportedBlocks(ValueError):
    pass


def _f16(raw: np.ndarray) -> np.ndarray:
    """[blocks, 2] bytes -> [blocks, 1] float32 (fp16 widens exactly)."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Runs of bytes whose low nibbles hold a run's first half of weights and high nibbles its second."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(qs.shape[0], -1)


def _q4_0(b: np.ndarray):
    d = _f16(b[:, :2])
    return _nibbles(b[:, 2:]), d, -8 * d


def _q4_1(b: np.ndarray):
    return _nibbles(b[:, 4:]), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q8_0(b: np.ndarray):
    d = _f16(b[:, :2])
    codes = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return codes, d, -128 * d


def _k4_scales(s: np.ndarray):
    """Q4_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins per super-block (llama.cpp get_scale_min_k4)."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(b: np.ndarray):
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k4_scales(b[:, 4:16])
    codes = _nibbles(b[:, 16:].reshape(n, 4, 32))  # four runs of 64 weights, one scale per 32
    return codes, d * sc, -(dmin * mn)


def _q6_k(b: np.ndarray):
    n = b.shape[0]
    ql, qh = b[:, :128].reshape(n, 2, 64), b[:, 128:192].reshape(n, 2, 32)
    sc, d = b[:, 192:208].view(np.int8).astype(np.float32), _f16(b[:, 208:210])
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-1)  # [n, 2, 128]
    high = np.concatenate([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], axis=-1)  # [n, 2, 128]
    codes = (low | (high << 4)).reshape(n, QK_K)
    scale = d * sc
    return codes, scale, -32 * scale


_READERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q6_K": _q6_k}


def affine_groups(raw: np.ndarray, fmt: str, rows: int, cols: int):
    """(codes, scales, mins) of a [rows, cols] weight stored as `fmt` blocks (`raw`: the tensor's bytes)."""
    if fmt not in _READERS:
        raise UnsupportedBlocks(f"GGUF {fmt} weights are not kept quantized (supported: {', '.join(_READERS)})")
    per_block, nbytes = FORMATS[fmt]
    if cols % per_block:
        raise UnsupportedBlocks(f"a {rows}x{cols} {fmt} tensor: rows are not whole blocks of {per_block}")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, nbytes)
    codes, scales, mins = _READERS[fmt](blocks)
    groups = per_block // GROUP  # a format's scales cover 32 or 16 weights: repeat them out to one per 16
    scales, mins = (np.repeat(a, groups // a.shape[1], axis=1) for a in (scales, mins))
    return (codes.reshape(rows, cols), scales.astype(np.float32).reshape(rows, cols // GROUP),
            mins.astype(np.float32).reshape(rows, cols // GROUP))
