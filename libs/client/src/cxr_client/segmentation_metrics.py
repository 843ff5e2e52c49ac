"""Dice and the 95th-percentile Hausdorff distance (HD95) of two binary masks, in pixels.

Written here on numpy and scipy's exact Euclidean distance transform rather than pulled from MONAI or
medpy (torch-sized dependencies for two formulas); the definitions, and what an empty mask gives, are
in docs/evaluate.md and follow MONAI's `compute_hausdorff_distance(percentile=95)`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

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


def surface_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each boundary pixel of `a`, the Euclidean distance (pixels) to the nearest boundary pixel of
    `b`; both masks must be non-empty. Computed in the box around both boundaries, which holds every
    candidate nearest pixel, so the distances are those of the whole image."""
    sa, sb = surface(a), surface(b)
    if not sa.any() or not sb.any():
        raise ValueError("surface distances need two non-empty masks")
    rows = np.flatnonzero((sa | sb).any(axis=1))
    cols = np.flatnonzero((sa | sb).any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    to_b = ndimage.distance_transform_edt(~sb[box])
    return np.asarray(to_b[sa[box]], dtype=np.float64)


def hausdorff(reference: np.ndarray, predicted: np.ndarray, percentile: float = 95.0) -> float | None:
    """max(P(d(∂A→∂B)), P(d(∂B→∂A))) with P the `percentile` (numpy's linear interpolation) of the
    directed boundary distances; 100 gives the Hausdorff distance. None (not estimable) when a mask
    is empty: with one empty the distance is infinite, with both there is no boundary to measure."""
    a, b = np.asarray(reference, dtype=bool), np.asarray(predicted, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} and {b.shape}")
    if not a.any() or not b.any():
        return None
    return float(
        max(np.percentile(surface_distances(a, b), percentile), np.percentile(surface_distances(b, a), percentile))
    )


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
