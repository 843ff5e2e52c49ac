"""The shared NIH DX file with its spacing attributes varied, and what the decoder must make of each variant:
shared by the decoder/measurement unit tests and the segmentation service tests."""

from __future__ import annotations

import io

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from cxr_serving import images
from tests.support.paths import DICOM_DIR

SOURCE = DICOM_DIR / "nih-dx-mono2-8bit.dcm"  # PixelSpacing = ImagerPixelSpacing = 0.835\0.684
ROW, COL = 0.835, 0.684


def dicom(**changes: object) -> bytes:
    """The shared NIH DX file with attributes set (None deletes one; bytes are written raw, unvalidated)."""
    ds = pydicom.dcmread(SOURCE)
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        elif isinstance(value, bytes):
            tag = Tag(keyword)
            ds[tag] = RawDataElement(tag, "DS", len(value), value, 0, False, True)
        else:
            setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


# name -> (attribute changes, expected source, expected (row, col) mm or None, expected factor)
SPACING_CASES = {
    "pixel_spacing": ({}, images.SPACING_PIXEL, (ROW, COL), 0.0),
    "pixel_spacing_wins_over_a_factor": (
        {"EstimatedRadiographicMagnificationFactor": 1.1},
        images.SPACING_PIXEL,
        (ROW, COL),
        0.0,
    ),
    "zero_pixel_spacing_imager_factor_1.1": (
        {"PixelSpacing": [0, 0], "EstimatedRadiographicMagnificationFactor": 1.1},
        images.SPACING_IMAGER_CORRECTED,
        (ROW / 1.1, COL / 1.1),
        1.1,
    ),
    "no_pixel_spacing_imager_factor_1.25": (
        {"PixelSpacing": None, "EstimatedRadiographicMagnificationFactor": 1.25},
        images.SPACING_IMAGER_CORRECTED,
        (ROW / 1.25, COL / 1.25),
        1.25,
    ),
    "negative_pixel_spacing_imager_no_factor": (
        {"PixelSpacing": [-0.5, 0.5]},
        images.SPACING_IMAGER_UNCORRECTED,
        (ROW, COL),
        0.0,
    ),
    "zero_pixel_spacing_imager_zero_factor": (
        {"PixelSpacing": [0, 0], "EstimatedRadiographicMagnificationFactor": 0},
        images.SPACING_IMAGER_UNCORRECTED,
        (ROW, COL),
        0.0,
    ),
    "unparsable_pixel_spacing_and_factor": (
        {"PixelSpacing": b"abc\\def ", "EstimatedRadiographicMagnificationFactor": b"x1.1"},
        images.SPACING_IMAGER_UNCORRECTED,
        (ROW, COL),
        0.0,
    ),
    "nan_pixel_spacing_imager_factor_1.1": (
        {"PixelSpacing": b"nan\\nan ", "EstimatedRadiographicMagnificationFactor": b"1.1 "},
        images.SPACING_IMAGER_CORRECTED,
        (ROW / 1.1, COL / 1.1),
        1.1,
    ),
    "zero_pixel_spacing_no_imager": (
        {"PixelSpacing": [0, 0], "ImagerPixelSpacing": None},
        images.SPACING_NONE,
        None,
        0.0,
    ),
    "zero_pixel_spacing_zero_imager": (
        {"PixelSpacing": [0, 0], "ImagerPixelSpacing": [0, 0], "EstimatedRadiographicMagnificationFactor": 1.1},
        images.SPACING_NONE,
        None,
        0.0,
    ),
}
