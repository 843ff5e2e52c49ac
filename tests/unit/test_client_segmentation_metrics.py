"""Dice and HD95 (cxr_client.segmentation_metrics) against hand-computed cases, against a brute-force
pairwise computation, and against scikit-image's Hausdorff distance; their empty-mask cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist
from skimage.metrics import hausdorff_distance

from cxr_client.segmentation_metrics import bootstrap_mean_ci, boundary_distances, dice, hausdorff, hd95, surface


def square(top: int, left: int, side: int = 40, shape: tuple[int, int] = (100, 100)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[top : top + side, left : left + side] = True
    return m


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_squares_offset_by_k_pixels(k: int) -> None:
    a, b = square(20, 20), square(20, 20 + k)
    # A's left edge (40 of its 156 boundary pixels) lies exactly k from B's boundary and no pixel is farther
    # (and the same from B's right edge to A): a quarter of each direction's distances are k, so P95 = k
    assert hd95(a, b) == k
    assert hausdorff(a, b, 100) == k
    # overlap 40 x (40 - k) of two 1600-pixel squares
    assert dice(a, b) == pytest.approx(2 * 40 * (40 - k) / 3200)
    assert hd95(a, square(20 + k, 20)) == k  # the same, moved down


def test_diagonal_offset_hausdorff_is_the_corner_distance() -> None:
    a, b = square(20, 20), square(23, 24)
    assert hausdorff(a, b, 100) == 5.0  # corner to corner: sqrt(3² + 4²)
    assert dice(a, b) == pytest.approx(2 * 37 * 36 / 3200)


def test_single_pixels() -> None:
    a, b = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    a[2, 3] = b[5, 7] = True
    assert hd95(a, b) == 5.0 and dice(a, b) == 0.0


def test_identical_disjoint_and_nested() -> None:
    a = square(10, 10, 30)
    assert dice(a, a) == 1.0 and hd95(a, a) == 0.0
    assert dice(a, square(60, 60, 30)) == 0.0
    inner = square(15, 15, 20)  # 5 pixels inside on every side
    assert dice(a, inner) == pytest.approx(2 * 400 / (900 + 400))
    assert hausdorff(a, inner, 100) == pytest.approx(5 * np.sqrt(2))  # an outer corner to the inner corner


def test_empty_masks() -> None:
    empty, a = np.zeros((30, 30), bool), square(5, 5, 10, (30, 30))
    assert dice(empty, empty) == 1.0  # both say absent
    assert hd95(empty, empty) is None  # no boundary to measure
    assert dice(a, empty) == dice(empty, a) == 0.0
    assert hd95(a, empty) is None and hd95(empty, a) is None  # infinite: not estimable
    with pytest.raises(ValueError, match="shape"):
        dice(a, np.zeros((31, 30), bool))


def test_masks_on_the_image_edge() -> None:
    full = np.ones((50, 60), dtype=bool)
    assert surface(full).sum() == 2 * 50 + 2 * 60 - 4  # the image edge is the boundary
    moved = np.zeros_like(full)
    moved[:, 3:] = True
    assert hd95(full, moved) == 3.0


def _blobs(seed: int, shape: tuple[int, int] = (96, 128)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.standard_normal(shape), 6)
    return smooth > np.quantile(smooth, 0.7)


def _brute_force(a: np.ndarray, b: np.ndarray, percentile: float) -> float:
    pa, pb = np.argwhere(surface(a)), np.argwhere(surface(b))
    d = cdist(pa, pb)
    return float(max(np.percentile(d.min(axis=1), percentile), np.percentile(d.min(axis=0), percentile)))


@pytest.mark.parametrize("seed", range(6))
def test_random_blobs_match_brute_force_and_scikit_image(seed: int) -> None:
    a, b = _blobs(seed), _blobs(seed + 100)
    assert hd95(a, b) == pytest.approx(_brute_force(a, b, 95), abs=1e-9)
    assert hausdorff(a, b, 100) == pytest.approx(_brute_force(a, b, 100), abs=1e-9)
    assert hausdorff(a, b, 100) == pytest.approx(hausdorff_distance(surface(a), surface(b)), abs=1e-9)
    assert hd95(a, b) <= hausdorff(a, b, 100)
    assert dice(a, b) == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize("kind", ["blobs", "noise"])
def test_the_tree_and_the_distance_transform_give_the_same_distances(kind: str) -> None:
    rng = np.random.default_rng(11)
    if kind == "blobs":  # smooth masks: "auto" takes the k-d tree
        a, b = _blobs(1), _blobs(2)
    else:  # fragmented masks: "auto" takes the distance transform
        a, b = rng.random((64, 80)) < 0.4, rng.random((64, 80)) < 0.4
    sa, sb = surface(a), surface(b)
    tree, edt = boundary_distances(sa, sb, "tree"), boundary_distances(sa, sb, "edt")
    for t, e in zip(tree, edt, strict=True):
        assert np.array_equal(t, e)
    assert hd95(a, b) == pytest.approx(_brute_force(a, b, 95), abs=1e-9)


def test_bootstrap_mean_ci() -> None:
    v = np.random.default_rng(1).random(50)
    lo, hi = bootstrap_mean_ci(v, n=500, random_seed=3)  # type: ignore[misc]
    assert lo < v.mean() < hi and hi - lo < 0.3
    assert bootstrap_mean_ci(v, n=500, random_seed=3) == (lo, hi)
    assert bootstrap_mean_ci(v, n=500, random_seed=4) != (lo, hi)
    assert bootstrap_mean_ci(np.full(7, 0.25), n=100, random_seed=0) == (0.25, 0.25)
    assert bootstrap_mean_ci(np.array([]), n=100, random_seed=0) is None
    with pytest.raises(ValueError):
        bootstrap_mean_ci(v, n=0, random_seed=0)
