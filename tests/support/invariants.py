"""What every decoder outcome must satisfy: a clean refusal or a usable image."""

from __future__ import annotations

import numpy as np

from cxr_serving.errors import ImageRejectedError
from cxr_serving.images import DecodedImage, DecodeLimits, decode_image

# Every reason the decoder may give; a new one must be added here on purpose.
DECODER_REASONS = frozenset(
    {
        "IMAGE_EMPTY",
        "IMAGE_TOO_LARGE",
        "IMAGE_FORMAT_UNKNOWN",
        "CONTENT_TYPE_UNSUPPORTED",
        "CONTENT_TYPE_MISMATCH",
        "IMAGE_FORMAT_NOT_ALLOWED",
        "IMAGE_TOO_SMALL",
        "IMAGE_ASPECT_RATIO",
        "IMAGE_TOO_MANY_PIXELS",
        "IMAGE_CORRUPT",
        "DICOM_NO_PIXELS",
        "DICOM_INVALID_WINDOW",
        "DICOM_UNSUPPORTED",
    }
)


def assert_usable(img: DecodedImage, limits: DecodeLimits) -> None:
    p = img.pixels
    assert isinstance(p, np.ndarray) and p.dtype == np.float32 and p.ndim == 2, (p.dtype, p.shape)
    assert min(p.shape) >= limits.min_side and p.size <= limits.max_pixels
    assert np.isfinite(p).all(), "non-finite pixels"
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0, (float(p.min()), float(p.max()))


def decode_outcome(data: bytes, content_type: str = "", limits: DecodeLimits | None = None) -> str:
    """'ok' or the refusal reason; any other exception propagates (a finding)."""
    limits = limits or DecodeLimits()
    try:
        img = decode_image(data, content_type, limits)
    except ImageRejectedError as exc:
        assert exc.reason in DECODER_REASONS, exc.reason
        assert exc.message
        return exc.reason
    assert_usable(img, limits)
    return "ok"
