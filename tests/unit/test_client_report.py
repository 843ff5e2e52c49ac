"""Rendering of the analyze-study report (no server): content, escaping, measurements wording."""

from __future__ import annotations

import json

from cxr_client.analyze import (
    DISCLAIMER,
    LiteratureReference,
    ReportFinding,
    _is_reportable,
    _measurements,
)
from cxr_client.report import to_html, to_json, to_markdown
from cxr_protos.segmentation.v1 import segmentation_service_pb2 as seg_pb
from tests.support.reports import report


def test_markdown_has_every_section():
    md = to_markdown(report(), overlay_path="overlay.png")
    assert md.startswith("# Chest X-ray study report: s1.png")
    assert DISCLAIMER in md and "UNTRAINED" not in md
    assert "| Cardiomegaly | 0.910 | 0.500 | **yes** | m |" in md and "| Mass | 0.100 | 0.500 | no | m |" in md
    assert "[1] **PMID:1** — for *Cardiomegaly*: x" in md
    assert "| classification | m | `abc123` |" in md
    assert "No segmentation results." in md and "![segmentation overlay](overlay.png)" in md


def test_html_escapes_server_text():
    evil = "<script>alert(1)</script>"
    r = report(
        study=evil,
        findings=[ReportFinding(label=evil, probability=0.5, threshold=0.5, positive=True, model=evil)],
        literature=[
            LiteratureReference(number=1, finding=evil, title=evil, source=evil, passage_id="p", score=1, excerpt=evil)
        ],
        warnings=[evil],
    )
    page = to_html(r)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "data:image/png;base64," in page
    md = to_markdown(r.model_copy(update={"findings": [r.findings[0].model_copy(update={"label": "a|b"})]}))
    assert "a\\|b" in md  # a pipe cannot break the table


def test_json_excludes_overlay_bytes():
    data = json.loads(to_json(report()))
    assert "overlay_png" not in data and data["disclaimer"] == DISCLAIMER and data["untrained"] is False


def test_measurement_wording_and_negative_labels():
    m = _measurements(seg_pb.Measurements(cardiothoracic_ratio=0.62, heart_width_px=620, thorax_width_px=1000))
    assert m.cardiothoracic_ratio == 0.62 and "above 0.5" in m.note
    m = _measurements(seg_pb.Measurements(cardiothoracic_ratio=0.45))
    assert "within the usual range" in m.note
    m = _measurements(seg_pb.Measurements(cardiothoracic_ratio_unavailable_reason="no heart mask"))
    assert m.cardiothoracic_ratio is None and m.note == ""
    md = to_markdown(report(measurements=m))
    assert "not computable (no heart mask)" in md
    for label in ("normal", "No Finding", "No_Finding"):
        assert not _is_reportable(ReportFinding(label=label, probability=1, threshold=0.5, positive=True, model="m"))
    assert _is_reportable(ReportFinding(label="abnormal", probability=1, threshold=0.5, positive=True, model="m"))
