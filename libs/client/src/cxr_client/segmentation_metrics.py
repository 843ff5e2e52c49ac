"""Dice and the 95th-percentile Hausdorff distance (HD95) of two binary masks, in pixels.

Written here on numpy and scipy (its exact Euclidean distance transform or a k-d tree) rather than
pulled from MONAI or medpy (torch-sized dependencies for two formulas); the definitions, and what an
empty mask gives, are in docs/evaluate.md and follow MONAI's `compute_hausdorff_distance(percentile=95)`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

# 4-connectivity: a pixel is on the surface when one of its 4 neighbours (or the image edge) is outside
_CROSS = ndimage.generate_binary_structure(2, 1)


def dice(reference: np.ndarray, predicted: np.ndarray) -> float:
    """2|A ∩ B| / (|A| + |B|); 1.0 when both masks are empty (both say the structure is absent)."""
    a, b = np.asarray(reference, dtype=bool), np.asarray(predicted, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} and {b.shape}")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def surface(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels: inside, with a 4-neighbour outside or on the image edge."""
    m = np.asarray(mask, dtype=bool)
    eroded = np.asarray(ndimage.binary_erosion(m, structure=_CROSS, border_value=0), dtype=bool)
    return np.asarray(m & ~eroded)


def _box(sa: np.ndarray, sb: np.ndarray) -> tuple[slice, slice]:
    """The box around both boundaries: it holds every candidate nearest pixel, so distances computed in it
    are those of the whole image."""
    both = sa | sb
    rows, cols = np.flatnonzero(both.any(axis=1)), np.flatnonzero(both.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def boundary_distances(sa: np.ndarray, sb: np.ndarray, method: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """The directed distances between two non-empty boundaries: from each pixel of `sa` to the nearest of
    `sb`, and back. Both methods are exact: a k-d tree of the boundary pixels ("tree", fast when the
    boundaries are a small part of their box, as a smooth anatomy mask's are) or the Euclidean distance
    transform of the box ("edt", fast for fragmented masks); "auto" picks by that share."""
    box = _box(sa, sb)
    sa, sb = sa[box], sb[box]
    if method == "auto":
        method = "tree" if 16 * (int(sa.sum()) + int(sb.sum())) < sa.size else "edt"
    if method == "tree":
        pa, pb = np.argwhere(sa), np.argwhere(sb)
        return cKDTree(pb).query(pa)[0], cKDTree(pa).query(pb)[0]
    return (
        np.asarray(ndimage.distance_transform_edt(~sb)[sa], dtype=np.float64),
        np.asarray(ndimage.distance_transform_edt(~sa)[sb], dtype=np.float64),
    )


def hausdorff(reference: np.ndarray, predicted: np.ndarray, percentile: float = 95.0) -> float | None:
    """max(P(d(∂A→∂B)), P(d(∂B→∂A))) with P the `percentile` (numpy's linear interpolation) of the
    directed boundary distances; 100 gives the Hausdorff distance. None (not estimable) when a mask
    is empty: with one empty the distance is infinite, with both there is no boundary to measure."""
    a, b = np.asarray(reference, dtype=bool), np.asarray(predicted, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} and {b.shape}")
    if not a.any() or not b.any():
        return None
    ab, ba = boundary_distances(surface(a), surface(b))
    return float(max(np.percentile(ab, percentile), np.percentile(ba, percentile)))


def hd95(reference: np.ndarray, predicted: np.ndarray) -> float | None:
    return hausdorff(reference, predicted, 95.0)


def bootstrap_mean_ci(
    values: np.ndarray, *, n: int, random_seed: int, level: float = 0.95
) -> tuple[float, float] | None:
    """Percentile CI of the mean over `n` resamples of the values (images), from a seeded generator;
    None without values."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return None
    if n < 1:
        raise ValueError("bootstrap n must be >= 1")
    rng = np.random.default_rng(random_seed)
    means = np.concatenate(  # in blocks of resamples: memory bounded by the block, not n x images
        [v[rng.integers(0, v.size, size=(min(256, n - i), v.size))].mean(axis=1) for i in range(0, n, 256)]
    )
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))
