"""Mask geometry and encodings: logits -> masks at the original size, PNG, COCO RLE, boxes, areas, CTR."""

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image as PILImage

from cxr_segmentation.masks import (
    area_mm2,
    bounding_box,
    decode_png,
    decode_rle,
    encode_png,
    encode_rle,
    logit_threshold,
    logits_to_masks,
)
from cxr_segmentation.measurements import cardiothoracic_ratio
from cxr_segmentation.overlay import render_overlay


def test_rle_known_answer_is_column_major_and_starts_with_zeros():
    m = np.array([[0, 1, 1], [0, 1, 0]], dtype=bool)
    # column-major: col0 = 0,0  col1 = 1,1  col2 = 1,0
    assert encode_rle(m) == ([2, 3], [2, 3, 1])
    starts_with_one = np.array([[1, 0], [1, 1]], dtype=bool)  # F order: 1,1,0,1
    assert encode_rle(starts_with_one) == ([2, 2], [0, 2, 1, 1])
    assert encode_rle(np.zeros((2, 2), bool)) == ([2, 2], [4])
    assert encode_rle(np.ones((2, 2), bool)) == ([2, 2], [0, 4])


@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 17), st.integers(1, 17))))
def test_rle_and_png_round_trip(mask):
    size, counts = encode_rle(mask)
    np.testing.assert_array_equal(decode_rle(size, counts), mask)
    assert sum(counts) == mask.size
    np.testing.assert_array_equal(decode_png(encode_png(mask)), mask)


def test_decode_rle_rejects_wrong_total():
    with pytest.raises(ValueError, match="expected 2x2"):
        decode_rle([2, 2], [1, 2])


def test_png_is_8_bit_0_or_255():
    m = np.zeros((5, 7), bool)
    m[1:3, 2:6] = True
    img = PILImage.open(io.BytesIO(encode_png(m)))
    assert img.mode == "L" and img.size == (7, 5)
    assert set(np.unique(np.asarray(img))) == {0, 255}


def test_png_of_a_real_size_mask_is_valid_and_compact():
    yy, xx = np.mgrid[:1024, :1024]
    m = (yy - 500) ** 2 / 300**2 + (xx - 400) ** 2 / 200**2 < 1  # a lung-sized ellipse
    data = encode_png(m)
    PILImage.open(io.BytesIO(data)).verify()  # chunk CRCs, structure
    img = PILImage.open(io.BytesIO(data))
    np.testing.assert_array_equal(np.asarray(img), m.astype(np.uint8) * 255)
    reference = io.BytesIO()  # what Pillow writes with its row filters: ours stays about as small
    img.save(reference, format="PNG", compress_level=1)
    assert len(data) < 1.3 * len(reference.getvalue()) and len(data) < 20_000


def test_png_refuses_an_empty_or_non_2d_mask():
    for bad in (np.zeros((0, 4), bool), np.zeros((2, 2, 2), bool)):
        with pytest.raises(ValueError, match="H x W mask"):
            encode_png(bad)


def test_logits_are_upsampled_to_the_original_size_before_thresholding():
    # a 2x2 logit map with one positive corner, upsampled to 8x6 (H x W)
    logits = torch.tensor([[[4.0, -4.0], [-4.0, -4.0]]])
    masks = logits_to_masks(logits, (8, 6), threshold=0.5)
    assert masks.shape == (1, 8, 6) and masks.dtype == bool
    # bilinear upsampling of logits gives a smooth boundary near the middle, not a 4x3 block copy
    assert masks[0, 0, 0] and not masks[0, -1, -1]
    assert 4 <= masks[0].sum() <= 24
    # thresholding on logits equals thresholding sigmoid probabilities
    z = torch.randn(3, 16, 16)
    for t in (0.1, 0.5, 0.9):
        np.testing.assert_array_equal(logits_to_masks(z, (16, 16), t), (torch.sigmoid(z) >= t).numpy())
    assert logit_threshold(0.5) == 0.0


def test_bounding_box_and_area():
    m = np.zeros((10, 20), bool)
    m[2:5, 3:9] = True
    m[7, 15] = True
    b = bounding_box(m)
    assert (b.x_min, b.y_min, b.x_max, b.y_max) == (3, 2, 15, 7)
    assert (b.width, b.height) == (13, 6)
    assert bounding_box(np.zeros((4, 4), bool)) is None
    assert area_mm2(100, (0.5, 0.2)) == pytest.approx(10.0)
    assert area_mm2(100, None) == 0.0


def synthetic_chest(h=100, w=120):
    """Lungs spanning x 10..59 and 60..109 (thorax 100 px), heart x 40..79 (40 px): CTR 0.4."""
    lungs_l = np.zeros((h, w), bool)
    lungs_r = np.zeros((h, w), bool)
    heart = np.zeros((h, w), bool)
    lungs_r[10:90, 10:60] = True  # patient's right lung is on the image left
    lungs_l[15:85, 60:110] = True
    heart[50:80, 40:80] = True
    heart[60:70, 38:40] = False  # the heart may be irregular: width is the horizontal extent
    return {"left_lung": lungs_l, "right_lung": lungs_r, "heart": heart}


def test_cardiothoracic_ratio_known_answer():
    ctr = cardiothoracic_ratio(synthetic_chest(), pixel_spacing_mm=(0.2, 0.5))
    assert ctr.computable and ctr.unavailable_reason == ""
    assert (ctr.heart_width_px, ctr.thorax_width_px) == (40, 100)
    assert ctr.ratio == pytest.approx(0.4)
    assert (ctr.heart_width_mm, ctr.thorax_width_mm) == (pytest.approx(20.0), pytest.approx(50.0))
    assert cardiothoracic_ratio(synthetic_chest()).heart_width_mm == 0.0


def test_cardiothoracic_ratio_enlarged_heart():
    masks = synthetic_chest()
    masks["heart"][50:80, 20:90] = True  # 70 px wide
    assert cardiothoracic_ratio(masks).ratio == pytest.approx(0.7)


def test_cardiothoracic_ratio_not_computable_reasons():
    masks = synthetic_chest()
    masks["heart"][:] = False
    ctr = cardiothoracic_ratio(masks)
    assert ctr.ratio == 0 and not ctr.computable and "heart" in ctr.unavailable_reason
    masks = synthetic_chest()
    masks["left_lung"][:] = False
    assert "left_lung" in cardiothoracic_ratio(masks).unavailable_reason
    masks = synthetic_chest()
    del masks["heart"]
    reason = cardiothoracic_ratio(masks).unavailable_reason
    assert "no heart class" in reason


def test_overlay_is_rgb_at_the_image_size_and_scaled_down_when_large():
    pixels = np.linspace(0, 1, 60 * 80, dtype=np.float32).reshape(60, 80)
    masks = np.zeros((2, 60, 80), bool)
    masks[0, 10:20, 10:20] = True
    img = PILImage.open(io.BytesIO(render_overlay(pixels, masks)))
    assert img.mode == "RGB" and img.size == (80, 60)
    rgb = np.asarray(img)
    assert rgb[15, 15, 0] > rgb[15, 15, 1]  # tinted red inside the first mask
    assert rgb[40, 40, 0] == rgb[40, 40, 1] == rgb[40, 40, 2]  # gray outside
    small = PILImage.open(io.BytesIO(render_overlay(pixels, masks, max_side=64)))
    assert max(small.size) == 64
