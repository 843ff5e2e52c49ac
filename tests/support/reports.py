"""A complete analyze-study report to render, shared by the client-report and measurement-wording tests."""

from __future__ import annotations

from typing import Any

from cxr_client.analyze import LiteratureReference, ModelVersion, ReportFinding, StudyReport


def report(**kw: Any) -> StudyReport:
    """One positive and one negative finding, a reference and a model; `kw` replaces fields."""
    base = StudyReport(
        study="s1.png",
        generated_at="2026-01-01T00:00:00+00:00",
        image={"width": 10, "height": 20, "format": "png"},
        findings=[
            ReportFinding(label="Cardiomegaly", probability=0.91, threshold=0.5, positive=True, model="m"),
            ReportFinding(label="Mass", probability=0.1, threshold=0.5, positive=False, model="m"),
        ],
        positive_findings=["Cardiomegaly"],
        literature=[
            LiteratureReference(
                number=1, finding="Cardiomegaly", title="", source="PMID:1", passage_id="p1", score=0.5, excerpt="x"
            )
        ],
        models=[ModelVersion(service="classification", name="m", version="abc123", untrained=False)],
        overlay_png=b"\x89PNG fake",
    )
    return base.model_copy(update=kw)
