"""The CPU mask fast paths give the outputs of the paths they replace, on masks of an untrained U-Net at 64 px
(as `bench.stack` serves it, with a resnet18 encoder) for shared NIH radiographs: OpenCV's bilinear upsampling
thresholds to torch's masks (a pixel may differ only where torch's logit is within 1e-5 of the cut), the PNGs'
ISA-L streams inflate (by zlib) to exactly the rows zlib was given before, no larger than zlib's level 1, and
the column-major RLE is numpy's order="F" one."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxr_segmentation.config import SegmentationConfig
from cxr_segmentation.masks import (
    bounding_box,
    decode_png,
    encode_pngs,
    encode_rle,
    logit_threshold,
    logits_to_masks,
)
from cxr_segmentation.measurements import cardiothoracic_ratio
from cxr_segmentation.model import SegmentationModel
from cxr_segmentation.networks import output_logits
from cxr_serving.device import InferenceDevice
from cxr_serving.images import decode_image
from cxr_serving.settings import PerformanceConfig
from tests.support.paths import cxr14_images
from tests.support.png_writer import SIGNATURE

N = 8
FLOAT_BAND = 1e-5  # float32 rounding of two bilinear implementations, in logit units
SIZES = [None, (1733, 1021), (300, 700), (48, 40)]  # None: the radiograph's own 512 x 512


@pytest.fixture(scope="module")
def nih_logits() -> list[tuple[torch.Tensor, tuple[int, int]]]:
    cfg = SegmentationConfig(encoder="resnet18", input_size=64, allow_untrained=True)
    model = SegmentationModel(cfg, InferenceDevice.resolve("cpu", PerformanceConfig()), warmup_batches=0)
    net = model.build(None)[0].eval()  # the served network's weights, without load()'s runtime preparation
    images = [decode_image(path.read_bytes()) for path in cxr14_images(N)]
    with torch.inference_mode():
        logits = output_logits(net, torch.stack([model.preprocess(image) for image in images]))
    return [(z, (image.height, image.width)) for z, image in zip(logits, images, strict=True)]


def torch_masks(logits: torch.Tensor, size: tuple[int, int], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The torch path (bilinear, align_corners=False, then the logit cut): masks and the upsampled logits."""
    z = logits.float()[None]
    if tuple(z.shape[-2:]) != size:
        z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
    return (z[0] >= logit_threshold(threshold)).numpy(), z[0].numpy()


def png_rows(mask: np.ndarray) -> bytes:
    rows = np.zeros((mask.shape[0], mask.shape[1] + 1), dtype=np.uint8)
    rows[:, 1:] = mask * np.uint8(255)
    return rows.tobytes()


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_opencv_masks_equal_torch_masks_on_nih(nih_logits, threshold):
    near = pixels = 0
    for logits, own in nih_logits:
        for size in SIZES:
            size = size or own
            ours = logits_to_masks(logits, size, threshold)
            theirs, upsampled = torch_masks(logits, size, threshold)
            assert ours.shape == theirs.shape and ours.dtype == bool
            differ = ours != theirs
            near += int(differ.sum())
            pixels += differ.size
            assert np.all(np.abs(upsampled[differ] - logit_threshold(threshold)) <= FLOAT_BAND)
    assert near <= 1e-6 * pixels  # a handful of pixels on the cut itself, of ~90 million


def idat_of(png: bytes) -> bytes:
    """The one IDAT chunk's data of a PNG that `encode_png` wrote (signature, IHDR, IDAT, IEND)."""
    assert png.startswith(SIGNATURE)
    at = len(SIGNATURE) + 8 + 13 + 4  # past the IHDR chunk
    length = int.from_bytes(png[at : at + 4], "big")
    assert png[at + 4 : at + 8] == b"IDAT" and png[at + 8 + length + 4 + 4 : at + 8 + length + 4 + 8] == b"IEND"
    assert zlib.crc32(png[at + 4 : at + 8 + length]) == int.from_bytes(png[at + 8 + length : at + 12 + length], "big")
    return png[at + 8 : at + 8 + length]


def test_png_streams_inflate_to_zlibs_rows_on_nih(nih_logits):
    ours_bytes = zlib_bytes = 0
    for logits, own in nih_logits:
        masks = logits_to_masks(logits, own, 0.5)
        for mask, png in zip(masks, encode_pngs(masks), strict=True):
            assert zlib.decompress(idat_of(png)) == png_rows(mask)
            np.testing.assert_array_equal(decode_png(png), mask)
            ours_bytes += len(png)
            zlib_bytes += len(zlib.compress(png_rows(mask), 1))
    assert ours_bytes <= zlib_bytes  # ISA-L's level 1: smaller than zlib's on these masks


def blocky_masks(rng: np.random.Generator, count: int, h: int, w: int) -> np.ndarray:
    """Runs of the lengths where deflate's matches are cut (1-4, 257-261, 516-517), rows often repeating."""
    masks = np.zeros((count, h, w), dtype=bool)
    for m in masks:
        for i in range(h):
            if i and rng.random() < 0.5:
                m[i] = m[i - 1]
                continue
            x, on = 0, bool(rng.integers(2))
            while x < w:
                run = int(rng.choice([1, 2, 3, 4, 257, 258, 259, 260, 261, 516, 517]))
                m[i, x : x + run] = on
                x, on = x + run, not on
    return masks


def test_pngs_of_every_run_length_shape_and_noise_decode_exactly():
    rng = np.random.default_rng(0)
    shapes = [(int(rng.integers(1, 30)), int(rng.integers(1, 700))) for _ in range(120)]
    shapes += [(h, w) for h in (1, 2, 3) for w in (1, 2, 3, 258, 259, 260, 261, 516, 517)]
    cases = [blocky_masks(rng, int(rng.integers(1, 6)), h, w) for h, w in shapes]
    cases += [rng.random((2, 64, 64)) < 0.5, np.ones((2, 5, 1), dtype=bool), rng.random((1, 3, 40000)) < 0.001]
    for masks in cases:
        for mask, png in zip(masks, encode_pngs(masks), strict=True):
            assert zlib.decompress(idat_of(png)) == png_rows(mask), mask.shape
            np.testing.assert_array_equal(decode_png(png), mask)


def test_rle_is_numpys_column_major_rle(nih_logits):
    rng = np.random.default_rng(2)
    masks = [*logits_to_masks(*nih_logits[0], 0.5), rng.random((7, 1)) < 0.5, rng.random((1, 9)) < 0.5]
    for mask in masks:
        flat = mask.ravel(order="F")
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        counts = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
        assert encode_rle(mask) == (list(mask.shape), [0, *counts] if flat[0] else counts)


def test_ctr_from_the_masks_boxes_equals_ctr_from_the_lungs_union(nih_logits):
    labels = SegmentationConfig().classes
    for logits, own in nih_logits:
        for threshold in (0.5, 0.2):
            masks = dict(zip(labels, logits_to_masks(logits, own, threshold), strict=True))
            union = bounding_box(np.logical_or(masks["left_lung"], masks["right_lung"]))
            ctr = cardiothoracic_ratio(masks, (0.1, 0.2), {k: bounding_box(m) for k, m in masks.items()})
            assert ctr == cardiothoracic_ratio(masks, (0.1, 0.2))
            if union is not None and ctr.thorax_width_px:
                assert ctr.thorax_width_px == union.width
