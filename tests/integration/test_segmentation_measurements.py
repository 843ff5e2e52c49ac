"""Physical sizes and plausible measurements end to end: a real segmentation service (an untrained U-Net at
64 px on the CPU, with fixed seeds) called over gRPC, and the analyze report built by the real client with the
classification and rag endpoints on a closed port (their part of the report is recorded as failed)."""

from __future__ import annotations

import grpc
import pytest

from cxr_client import AsyncCxrClient, ClientConfig
from cxr_client.analyze import UNTRAINED_MEASUREMENT, analyze_study
from cxr_client.report import to_html, to_json, to_markdown
from cxr_protos.common.v1 import common_pb2
from cxr_protos.segmentation.v1 import segmentation_service_pb2 as pb
from cxr_protos.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc
from cxr_segmentation.service import build_binding
from cxr_serving import images
from tests.support.paths import cxr14_images
from tests.support.servers import TEST_KEY, auth, free_port, make_settings, running_server
from tests.support.spacing import COL, SPACING_CASES, dicom

SEG = {"enabled": True, "allow_untrained": True, "input_size": 64, "encoder": "resnet18"}
ENUM = {
    images.SPACING_NONE: pb.SPACING_SOURCE_NONE,
    images.SPACING_PIXEL: pb.SPACING_SOURCE_PIXEL_SPACING,
    images.SPACING_IMAGER_CORRECTED: pb.SPACING_SOURCE_IMAGER_PIXEL_SPACING_CORRECTED,
    images.SPACING_IMAGER_UNCORRECTED: pb.SPACING_SOURCE_IMAGER_PIXEL_SPACING_UNCORRECTED,
}
CUT_OFF_READINGS = ("cut-off", "usual range", "cardiomegaly")


def settings(**seg):
    return make_settings(models__segmentation={**SEG, **seg}, server_config__max_batch_delay_ms=2)


def client_config(seg_port: int) -> ClientConfig:
    closed = f"127.0.0.1:{free_port()}"
    endpoints = {"classification": closed, "segmentation": f"127.0.0.1:{seg_port}", "rag": closed}
    return ClientConfig(endpoints=endpoints, api_key=TEST_KEY, timeout_s=20)


async def test_every_mm_value_follows_the_spacing_source_and_the_magnification_factor():
    # seed 0 at threshold 0.3: the random weights cover the image with every class, so every mm value is non-zero
    s = settings(seed=0, threshold=0.3)
    async with running_server(s, build_binding(s)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.SegmentationServiceStub(ch)
            responses = {}
            for case, (changes, source, spacing, factor) in SPACING_CASES.items():
                req = pb.SegmentImageRequest(
                    image=common_pb2.Image(data=dicom(**changes)), mask_encoding=pb.MASK_ENCODING_NONE
                )
                resp = responses[case] = await stub.SegmentImage(req, metadata=auth())
                assert resp.spacing_source == ENUM[source], case
                assert resp.magnification_factor == pytest.approx(factor), case
                row, col = spacing or (0.0, 0.0)
                assert (resp.image.pixel_spacing_row_mm, resp.image.pixel_spacing_column_mm) == pytest.approx(
                    (row, col)
                )
                assert all(m.area_pixels > 0 for m in resp.masks), case
                for m in resp.masks:
                    assert m.area_mm2 == pytest.approx(m.area_pixels * row * col), (case, m.label)
                meas = resp.measurements
                assert meas.heart_width_px > 0 and meas.thorax_width_px > 0
                assert meas.heart_width_mm == pytest.approx(meas.heart_width_px * col), case
                assert meas.thorax_width_mm == pytest.approx(meas.thorax_width_px * col), case
            png = await stub.SegmentImage(
                pb.SegmentImageRequest(image=common_pb2.Image(data=cxr14_images(1)[0].read_bytes())), metadata=auth()
            )
            assert png.spacing_source == pb.SPACING_SOURCE_NONE and png.magnification_factor == 0.0
    # the same pixels give the same masks: with the factor 1.1, every mm value is the detector's / 1.1 (/ 1.1² areas)
    corrected = responses["zero_pixel_spacing_imager_factor_1.1"]
    detector = responses["zero_pixel_spacing_imager_zero_factor"]
    assert [m.area_pixels for m in corrected.masks] == [m.area_pixels for m in detector.masks]
    for c, d in zip(corrected.masks, detector.masks, strict=True):
        assert c.area_mm2 == pytest.approx(d.area_mm2 / 1.1**2)
    assert corrected.measurements.heart_width_mm == pytest.approx(detector.measurements.heart_width_mm / 1.1)
    assert corrected.measurements.thorax_width_mm == pytest.approx(detector.measurements.thorax_width_mm / 1.1)
    assert detector.measurements.heart_width_mm == pytest.approx(detector.measurements.heart_width_px * COL)


async def test_untrained_analyze_report_never_reads_the_ratio_against_a_cut_off():
    # seed 3 at threshold 0.6 gives these NIH images plausible ratios (about 0.3 to 0.9): numbers a report could read
    s = settings(seed=3, threshold=0.6)
    async with running_server(s, build_binding(s)) as server:
        async with AsyncCxrClient(client_config(server.port)) as client:
            ratios = []
            for path in cxr14_images(3):
                raw = await client.segment(path, mask_encoding="none")
                ratio = raw.measurements.cardiothoracic_ratio
                assert raw.untrained and 0.0 < ratio < 1.0 and not raw.measurements.cardiothoracic_ratio_implausible
                ratios.append(ratio)
                report = await analyze_study(client, path, include_overlay=False)
                assert report.untrained and "classification" in report.errors and report.findings == []
                assert report.measurements is not None
                assert report.measurements.cardiothoracic_ratio == pytest.approx(ratio, abs=1e-4)
                md, page, js = to_markdown(report), to_html(report), to_json(report)
                assert f"**{ratio:.3f}** — {UNTRAINED_MEASUREMENT}" in md and UNTRAINED_MEASUREMENT in page
                for text in (md, page, js):
                    assert not any(word in text.lower() for word in CUT_OFF_READINGS), text
            assert any(r > 0.5 for r in ratios) and any(r <= 0.5 for r in ratios)  # both readings were possible
            magnified = await analyze_study(
                client, dicom(PixelSpacing=[0, 0], EstimatedRadiographicMagnificationFactor=1.1), include_overlay=False
            )
            assert "Sizes in mm from DICOM ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor 1.1" in (
                to_markdown(magnified)
            )


async def test_service_flags_a_heart_as_wide_as_the_thorax_and_the_report_shows_no_value():
    # seed 0 at threshold 0.5: the heart and both lungs cover all 512 columns, a ratio of exactly 1
    s = settings(seed=0, threshold=0.5)
    async with running_server(s, build_binding(s)) as server:
        async with AsyncCxrClient(client_config(server.port)) as client:
            source = dicom()
            raw = await client.segment(source, mask_encoding="none")
            m = raw.measurements
            assert (m.heart_width_px, m.thorax_width_px) == (512, 512)
            assert m.cardiothoracic_ratio == 0.0 and m.cardiothoracic_ratio_implausible
            assert "implausible" in m.cardiothoracic_ratio_unavailable_reason
            assert "as wide as the thorax" in m.cardiothoracic_ratio_unavailable_reason
            report = await analyze_study(client, source, include_overlay=False)
    assert report.measurements is not None and report.measurements.cardiothoracic_ratio is None
    md = to_markdown(report)
    assert "- Cardiothoracic ratio: implausible, not reported (implausible: the heart mask (512 px wide)" in md
    assert "**1.000**" not in md and "cut-off" not in md
