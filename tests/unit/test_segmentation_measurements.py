"""Where physical sizes come from (PixelSpacing, ImagerPixelSpacing with or without the magnification factor,
none) and which cardiothoracic ratios are plausible: decoder, measurements, response and report, no server."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_client.analyze import UNTRAINED_MEASUREMENT, _measurements
from cxr_client.report import to_html, to_markdown
from cxr_protos.common.v1 import common_pb2
from cxr_protos.segmentation.v1 import segmentation_service_pb2 as pb
from cxr_segmentation.measurements import cardiothoracic_ratio
from cxr_segmentation.postprocess import PostprocessOptions, postprocess
from cxr_segmentation.servicer import to_response
from cxr_serving import images
from cxr_serving.images import decode_image
from tests.support.paths import cxr14_images
from tests.support.reports import report
from tests.support.spacing import COL, ROW, SPACING_CASES, dicom


@pytest.mark.parametrize("case", list(SPACING_CASES))
def test_decoder_names_the_spacing_source_and_applies_the_magnification_factor(case):
    changes, source, spacing, factor = SPACING_CASES[case]
    img = decode_image(dicom(**changes), "application/dicom")
    assert img.pixel_spacing_source == source
    assert img.magnification_factor == pytest.approx(factor)
    if spacing is None:
        assert img.pixel_spacing_mm is None
    else:
        assert img.pixel_spacing_mm == pytest.approx(spacing, rel=1e-9)


def test_png_has_no_spacing():
    img = decode_image(cxr14_images(1)[0].read_bytes())
    assert img.pixel_spacing_mm is None and img.pixel_spacing_source == images.SPACING_NONE


def chest(heart_cols: tuple[int, int], lung_cols: tuple[int, int] = (10, 110), size: int = 600):
    """Two lungs spanning columns lung_cols (split in the middle) and a heart spanning heart_cols."""
    h = np.zeros((100, size), bool)
    left, right, heart = h.copy(), h.copy(), h.copy()
    mid = (lung_cols[0] + lung_cols[1]) // 2
    right[10:90, lung_cols[0] : mid] = True
    left[10:90, mid : lung_cols[1]] = True
    heart[50:80, heart_cols[0] : heart_cols[1]] = True
    return {"left_lung": left, "right_lung": right, "heart": heart}


def test_a_heart_wider_than_the_thorax_is_implausible_with_a_reason_and_no_value():
    ctr = cardiothoracic_ratio(chest(heart_cols=(0, 125)), pixel_spacing_mm=(0.5, 0.5))  # 125 px vs 100 px
    assert ctr.implausible and ctr.ratio == 0.0 and not ctr.computable
    assert "implausible" in ctr.unavailable_reason and "wider than the thorax" in ctr.unavailable_reason
    assert "1.250" in ctr.unavailable_reason
    # the widths still describe the masks
    assert (ctr.heart_width_px, ctr.thorax_width_px, ctr.heart_width_mm) == (125, 100, 62.5)


def test_a_ratio_just_over_one_is_implausible():
    ctr = cardiothoracic_ratio(chest(heart_cols=(10, 511), lung_cols=(10, 510)))  # 501 / 500 = 1.002
    assert ctr.heart_width_px / ctr.thorax_width_px == pytest.approx(1.002)
    assert ctr.implausible and ctr.ratio == 0.0 and "1.002" in ctr.unavailable_reason


def test_a_ratio_of_exactly_one_is_implausible():
    ctr = cardiothoracic_ratio(chest(heart_cols=(10, 110)))
    assert ctr.implausible and ctr.ratio == 0.0 and "as wide as the thorax" in ctr.unavailable_reason


def test_a_plausible_ratio_is_a_value():
    ctr = cardiothoracic_ratio(chest(heart_cols=(40, 95)))
    assert not ctr.implausible and ctr.computable and ctr.ratio == pytest.approx(0.55)


def test_response_carries_the_flag_and_the_spacing_source():
    img = decode_image(dicom(PixelSpacing=[0, 0], EstimatedRadiographicMagnificationFactor=1.1))
    masks = chest(heart_cols=(0, 125), size=512)
    stacked = np.zeros((3, img.height, img.width), bool)
    for i, label in enumerate(("left_lung", "right_lung", "heart")):
        stacked[i, : masks[label].shape[0]] = masks[label]
    labels = ["left_lung", "right_lung", "heart"]
    result = postprocess(img, stacked, labels, PostprocessOptions(threshold=0.5, classes=labels, encoding="none"))
    resp = to_response(result, status_info=common_pb2.ModelInfo(name="m"), image=common_pb2.ImageMetadata())
    m = resp.measurements
    assert m.cardiothoracic_ratio == 0.0 and m.cardiothoracic_ratio_implausible
    assert "wider than the thorax" in m.cardiothoracic_ratio_unavailable_reason
    assert resp.spacing_source == pb.SPACING_SOURCE_IMAGER_PIXEL_SPACING_CORRECTED
    assert resp.magnification_factor == pytest.approx(1.1)
    assert m.heart_width_mm == pytest.approx(125 * COL / 1.1)
    heart = next(a for a in resp.masks if a.label == "heart")
    assert heart.area_mm2 == pytest.approx(heart.area_pixels * ROW * COL / 1.1**2)


@pytest.mark.parametrize(
    ("source", "enum"),
    [
        (images.SPACING_NONE, pb.SPACING_SOURCE_NONE),
        (images.SPACING_PIXEL, pb.SPACING_SOURCE_PIXEL_SPACING),
        (images.SPACING_IMAGER_CORRECTED, pb.SPACING_SOURCE_IMAGER_PIXEL_SPACING_CORRECTED),
        (images.SPACING_IMAGER_UNCORRECTED, pb.SPACING_SOURCE_IMAGER_PIXEL_SPACING_UNCORRECTED),
    ],
)
def test_every_decoder_spacing_source_has_its_enum_value(source, enum):
    from cxr_segmentation.measurements import CardiothoracicRatio
    from cxr_segmentation.postprocess import SegmentationResult

    result = SegmentationResult([], CardiothoracicRatio(), spacing_source=source)
    resp = to_response(result, status_info=common_pb2.ModelInfo(), image=common_pb2.ImageMetadata())
    assert resp.spacing_source == enum


CUT_OFF_WORDS = ("cut-off", "usual range", "cardiomegaly", "0.5")


def test_report_never_reads_an_untrained_ratio_against_the_cut_off():
    for ratio in (0.3, 0.62):
        m = _measurements(pb.Measurements(cardiothoracic_ratio=ratio), untrained=True)
        assert m.cardiothoracic_ratio == ratio and m.note == UNTRAINED_MEASUREMENT
        md = to_markdown(report(measurements=m, findings=[], positive_findings=[], literature=[]))
        section = md.split("## Measurements")[1].split("## Literature")[0]
        assert f"**{ratio:.3f}**" in section and UNTRAINED_MEASUREMENT in section
        assert not any(word in section.lower() for word in CUT_OFF_WORDS), section
    trained = _measurements(pb.Measurements(cardiothoracic_ratio=0.62))
    assert "cut-off" in trained.note  # a trained model's ratio is still read


def test_report_shows_an_implausible_ratio_as_implausible_never_as_a_value():
    reason = "implausible: the heart mask (501 px wide) is wider than the thorax"
    flagged = pb.Measurements(
        cardiothoracic_ratio_implausible=True, cardiothoracic_ratio_unavailable_reason=reason, heart_width_px=501
    )
    unflagged = pb.Measurements(cardiothoracic_ratio=1.002)  # as a server without the check sent it
    for proto in (flagged, unflagged):
        m = _measurements(proto)
        assert m.cardiothoracic_ratio is None and m.cardiothoracic_ratio_implausible and m.note == ""
        assert m.cardiothoracic_ratio_unavailable_reason.startswith("implausible")
        r = report(measurements=m)
        md, page = to_markdown(r), to_html(r)
        assert "Cardiothoracic ratio: implausible, not reported (implausible" in md and "1.002**" not in md
        assert "Cardiothoracic ratio: implausible, not reported" in page and "<b>1.002" not in page


def test_report_says_where_the_millimetres_come_from():
    m = _measurements(
        pb.Measurements(heart_width_px=100, heart_width_mm=62.2),
        spacing_source="SPACING_SOURCE_IMAGER_PIXEL_SPACING_CORRECTED",
        magnification_factor=1.1,
    )
    md = to_markdown(report(measurements=m))
    assert "Sizes in mm from DICOM ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor 1.1" in md
    assert _measurements(pb.Measurements(), spacing_source="SPACING_SOURCE_NONE").spacing_source == ""
