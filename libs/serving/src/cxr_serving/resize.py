"""torch's antialiased bilinear resize (`interpolate(..., antialias=True)`, `align_corners=False`) as a table of
weights, and a uint8 or float32 image resized, scaled to [0, 1] and normalised per channel in one C pass with it.

Both image services resize with this kernel; the table is its own weights (tests compare them with torch's),
and the one pass (`cxr_serving._pixels`, without the GIL) replaces ~10 tensor operations and their
temporaries on the serving path. Kept free of torch, so a decode thread starts no OpenMP team of its own
(one beside each forward thread's makes the forwards wait to wake theirs): callers wrap the result with
`torch.from_numpy`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from cxr_serving.images import UNIT_8BIT

try:  # optional: without a C compiler the callers take their tensor paths
    from cxr_serving._pixels import resize_normalize_into as _resize_normalize_into
except ImportError:  # pragma: no cover
    _resize_normalize_into = None


def kernel_built() -> bool:
    """Whether the one-pass C resize + normalise serves (else the callers' tensor paths do)."""
    return _resize_normalize_into is not None


@functools.lru_cache(maxsize=32)
def antialias_table(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's antialiased bilinear weights along one axis (`align_corners=False`) as, for each output index,
    its first input index (int32), its tap count (int32) and K weights (float32, zero past the count): the
    triangle filter widened by the scale when shrinking, each row normalised, computed in the float32 /
    double steps of torch's CPU kernel (UpSampleKernel.cpp) so the weights are its own."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    support = scale if scale >= 1.0 else f32(1.0)
    invscale = np.float64(f32(1.0 / np.float64(scale))) if scale >= 1.0 else np.float64(1.0)
    center = (np.float64(scale) * (np.arange(out_size) + 0.5)).astype(f32)
    lo = np.maximum(((center - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    hi = np.minimum(((center + support).astype(np.float64) + 0.5).astype(np.int64), in_size)
    taps = lo[:, None] + np.arange(int((hi - lo).max()))[None, :]  # out_size x K, past `hi` masked below
    inside = taps < hi[:, None]
    x = (((taps.astype(f32) - center[:, None]).astype(np.float64) + 0.5) * invscale).astype(f32)
    w = np.where(inside, np.maximum(1.0 - np.abs(x).astype(np.float64), 0.0).astype(f32), f32(0.0))
    total = np.zeros(out_size, dtype=f32)
    for k in range(w.shape[1]):  # in tap order, in float32, as the kernel sums them
        total += w[:, k]
    w = np.where(total[:, None] != 0, w / np.where(total == 0, f32(1.0), total)[:, None], w).astype(f32)
    table = (
        lo.astype(np.int32),
        inside.sum(axis=1).astype(np.int32),  # each row's taps are a prefix: ascending and distinct
        np.ascontiguousarray(np.where(inside, w, f32(0.0)), dtype=f32),
    )
    for a in table:
        a.flags.writeable = False  # cached and shared
    return table


def resize_normalize(pixels: np.ndarray, size: int, sub: Sequence[float], div: Sequence[float]) -> np.ndarray | None:
    """H x W uint8 (value / 255) or float32 (already in [0, 1]) -> len(sub) x size x size float32: resized, scaled,
    then `(x - sub[c]) / div[c]` per channel, in float32 as the tensor path computes it; None for another sample
    type or without the C module."""
    if _resize_normalize_into is None or pixels.ndim != 2:
        return None
    if pixels.dtype == np.uint8:
        unit = float(UNIT_8BIT)
    elif pixels.dtype == np.float32:
        unit = 1.0
    else:
        return None
    height, width = pixels.shape
    rows, cols = antialias_table(height, size), antialias_table(width, size)
    out = np.empty((len(sub), size, size), dtype=np.float32)
    # C order and aligned: the C loop reads float32 samples through a float pointer
    _resize_normalize_into(
        np.require(pixels, requirements=("C", "A")), out, height, width, *rows, *cols, unit, tuple(sub), tuple(div)
    )
    return out
