"""Which image path serves is visible: a build without the C kernels logs a WARNING naming what falls back, and
`cxr_pixel_kernels_built` reads 0 (tests/integration/test_service_pixel_kernels.py starts real services)."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from cxr_serving import pixel_kernels, png_gray8, resize
from cxr_serving.metrics import publish_pixel_kernels

publish_pixel_kernels()  # as a model service's server does at start


@pytest.mark.skipif(not png_gray8.kernel_built() or not resize.kernel_built(), reason="a build without the C kernels")
def test_a_build_with_the_kernels_says_so(caplog):
    assert pixel_kernels.missing() == []
    with caplog.at_level(logging.INFO):
        assert pixel_kernels.report(logging.getLogger("t")) is True
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "C image kernels: built" in caplog.text
    assert REGISTRY.get_sample_value("cxr_pixel_kernels_built") == 1.0


def test_a_missing_kernel_is_a_warning_naming_what_falls_back(caplog, monkeypatch):
    monkeypatch.setattr(png_gray8, "unfilter_into", None)
    assert pixel_kernels.missing() == ["PNG row filters"]
    monkeypatch.setattr(resize, "_resize_normalize_into", None)
    assert pixel_kernels.missing() == ["PNG row filters", "one-pass resize + normalise"]
    with caplog.at_level(logging.INFO):
        assert pixel_kernels.report(logging.getLogger("t")) is False
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "PNG row filters, one-pass resize + normalise fall back to OpenCV / torch" in record.getMessage()
    assert pixel_kernels.REBUILD in record.getMessage()
    assert REGISTRY.get_sample_value("cxr_pixel_kernels_built") == 0.0
