"""Each GGUF block format read into codes/scales/mins gives back gguf's own dequantization bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from headrace.common.models.gguf_blocks import FORMATS, UnsupportedBlocks, affine_groups


def random_blocks(fmt: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random raw blocks: every code pattern occurs; fp16 scale fields are set to finite values of
    ordinary weight magnitude (random bytes would hold NaN/inf scales)."""
    per_block, nbytes = FORMATS[fmt]
    rng = np.random.default_rng(seed)
    n = rows * cols // per_block
    raw = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    halves = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}[fmt]
    for at in halves:
        raw[:, at:at + 2] = rng.uniform(1e-4, 2e-2, size=(n, 1)).astype(np.float16).view(np.uint8)
    if fmt == "Q4_1":  # the min is a signed number
        raw[:, 2:4] = (-rng.uniform(0, 0.1, size=(n, 1))).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, cols // per_block * nbytes)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_affine_groups_equal_gguf_dequantize(fmt):
    rows, cols = 6, 512
    raw = random_blocks(fmt, rows, cols)
    ref = dequantize(raw, GGMLQuantizationType[fmt]).reshape(rows, cols)
    codes, scales, mins = affine_groups(raw, fmt, rows, cols)
    assert codes.dtype == np.uint8 and scales.shape == (rows, cols // 16) == mins.shape
    ours = codes.astype(np.float32) * np.repeat(scales, 16, axis=1) + np.repeat(mins, 16, axis=1)
    np.testing.assert_array_equal(ours, ref)
    top = {"Q8_0": 255, "Q6_K": 63}.get(fmt, 15)
    assert codes.max() == top and codes.min() == 0


def test_unsupported_format_is_named():
    with pytest.raises(UnsupportedBlocks, match="Q5_K"):
        affine_groups(np.zeros((1, 176), np.uint8), "Q5_K", 1, 256)
