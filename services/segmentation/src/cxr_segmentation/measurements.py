"""Measurements derived from the masks: the cardiothoracic ratio (CTR).

CTR = maximal transverse heart diameter / maximal internal thoracic diameter, as read on a PA
chest film. From masks: the heart width is the horizontal extent of the heart mask (its
rightmost minus leftmost pixel, + 1); the thorax width is the horizontal extent of the two
lungs together (outer edge of one lung to the outer edge of the other). Both lungs and the
heart must be present; otherwise the ratio is 0 and `unavailable_reason` says why. A heart as wide as
or wider than the thorax (a ratio outside (0, 1)) is anatomically impossible on a PA film: the
masks are wrong, so the ratio is withheld (0), `implausible` is set and `unavailable_reason` says why.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cxr_segmentation.masks import BoundingBox, bounding_box

HEART = "heart"
LUNGS = ("left_lung", "right_lung")


@dataclass(frozen=True)
class CardiothoracicRatio:
    ratio: float = 0.0
    unavailable_reason: str = ""
    heart_width_px: float = 0.0
    thorax_width_px: float = 0.0
    heart_width_mm: float = 0.0
    thorax_width_mm: float = 0.0
    implausible: bool = False

    @property
    def computable(self) -> bool:
        return not self.unavailable_reason


def cardiothoracic_ratio(
    masks: Mapping[str, np.ndarray],
    pixel_spacing_mm: tuple[float, float] | None = None,
    boxes: Mapping[str, BoundingBox | None] | None = None,
) -> CardiothoracicRatio:
    """`masks` maps class names to H x W bool masks; spacing is (row, column) in mm; `boxes`, the masks'
    bounding boxes where the caller has them already."""
    absent = [name for name in (HEART, *LUNGS) if name not in masks]
    if absent:
        return CardiothoracicRatio(
            unavailable_reason=f"the model has no {', '.join(absent)} class: the ratio needs heart, left_lung and "
            "right_lung masks"
        )
    box = {name: boxes[name] if boxes and name in boxes else bounding_box(masks[name]) for name in (HEART, *LUNGS)}
    empty = [name for name in (HEART, *LUNGS) if box[name] is None]
    if empty:
        return CardiothoracicRatio(unavailable_reason=f"no {' / '.join(empty)} found in the image (empty mask)")
    heart, left, right = box[HEART], box[LUNGS[0]], box[LUNGS[1]]
    assert heart is not None and left is not None and right is not None
    # the two lungs' horizontal extent together: the box of their union, without making the union
    heart_w = float(heart.width)
    thorax_w = float(max(left.x_max, right.x_max) - min(left.x_min, right.x_min) + 1)
    col_mm = pixel_spacing_mm[1] if pixel_spacing_mm else 0.0
    widths = CardiothoracicRatio(
        heart_width_px=heart_w,
        thorax_width_px=thorax_w,
        heart_width_mm=heart_w * col_mm,
        thorax_width_mm=thorax_w * col_mm,
    )
    ratio = heart_w / thorax_w
    if not (math.isfinite(ratio) and 0.0 < ratio < 1.0):
        relation = "wider than" if heart_w > thorax_w else "as wide as"
        return dataclasses.replace(
            widths,
            unavailable_reason=f"implausible: the heart mask ({heart_w:.0f} px wide) is {relation} the thorax "
            f"({thorax_w:.0f} px across both lungs), a ratio of {ratio:.3f} outside (0, 1); the masks are wrong",
            implausible=True,
        )
    return dataclasses.replace(widths, ratio=ratio)
