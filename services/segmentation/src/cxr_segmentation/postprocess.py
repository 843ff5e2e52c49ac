"""Per-request work after the forward pass: masks at the original size, encodings, areas, boxes,
measurements, overlay and DICOM-SEG. Runs on the decode pool, not in the batch worker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from cxr_segmentation.dicom_seg import build_dicom_seg
from cxr_segmentation.masks import BoundingBox, area_mm2, bounding_box, encode_pngs, encode_rle, logits_to_masks
from cxr_segmentation.measurements import HEART, LUNGS, CardiothoracicRatio, cardiothoracic_ratio
from cxr_segmentation.overlay import render_overlay
from cxr_serving.images import SPACING_NONE, DecodedImage

Encoding = Literal["png", "rle", "none"]


@dataclass
class ClassMask:
    label: str
    width: int
    height: int
    area_pixels: int
    area_mm2: float
    bounding_box: BoundingBox | None
    png: bytes = b""
    rle_size: list[int] = field(default_factory=list)
    rle_counts: list[int] = field(default_factory=list)


@dataclass
class SegmentationResult:
    masks: list[ClassMask]
    ctr: CardiothoracicRatio
    overlay_png: bytes = b""
    dicom_seg: bytes = b""
    spacing_source: str = SPACING_NONE  # where the mm values come from (cxr_serving.images.SPACING_*)
    magnification_factor: float = 0.0


@dataclass(frozen=True)
class PostprocessOptions:
    threshold: float
    classes: Sequence[str]  # returned classes, in model order
    encoding: Encoding = "png"
    overlay: bool = False
    dicom_seg: bool = False
    overlay_max_side: int = 1024
    algorithm_name: str = "cxr-segmentation"
    algorithm_version: str = ""
    image: DecodedImage | None = None  # the request's decoded image, set once decoded


def postprocess(
    image: DecodedImage, output: torch.Tensor | np.ndarray, labels: Sequence[str], opts: PostprocessOptions
) -> SegmentationResult:
    """`output`: the model's logits (C x h x w), or masks already made on the device (C x H x W bool)."""
    if isinstance(output, np.ndarray):
        masks = output
    else:
        masks = logits_to_masks(output, (image.height, image.width), opts.threshold)
    by_label = dict(zip(labels, masks, strict=True))
    boxed = {*opts.classes, HEART, *LUNGS} & by_label.keys()  # each mask's box made once, for its class and the CTR
    boxes = {label: bounding_box(by_label[label]) for label in boxed}
    ctr = cardiothoracic_ratio(by_label, image.pixel_spacing_mm, boxes)
    selected = np.stack([by_label[c] for c in opts.classes]) if opts.classes else masks[:0]
    pngs = encode_pngs(selected) if opts.encoding == "png" and len(selected) else []
    out: list[ClassMask] = []
    for i, label in enumerate(opts.classes):
        m = selected[i]
        area = int(np.count_nonzero(m))
        cm = ClassMask(label, image.width, image.height, area, area_mm2(area, image.pixel_spacing_mm), boxes[label])
        if opts.encoding == "png":
            cm.png = pngs[i]
        elif opts.encoding == "rle":
            cm.rle_size, cm.rle_counts = encode_rle(m)
        out.append(cm)
    overlay = render_overlay(image.pixels, selected, max_side=opts.overlay_max_side) if opts.overlay else b""
    seg = (
        build_dicom_seg(
            image.dataset,
            selected,
            list(opts.classes),
            algorithm_name=opts.algorithm_name,
            algorithm_version=opts.algorithm_version,
        )
        if opts.dicom_seg
        else b""
    )
    return SegmentationResult(out, ctr, overlay, seg, image.pixel_spacing_source, image.magnification_factor)
