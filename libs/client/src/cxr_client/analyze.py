"""The analyze-study workflow: classification + segmentation of one study, literature for the
positive findings, one structured report.

It lives in the client (not in a service) on purpose: it only composes public RPCs of the three
services, so it works the same against the local stack, one gateway endpoint, or per-service
endpoints; it adds no new server to deploy, scale or secure; and an agent (through `cxr-mcp`)
and a person (through `cxr analyze`) get the same report. Classification and segmentation run
concurrently, then one literature search per positive finding (concurrently too).

A failure of one service does not lose the others' results: the report records it under
`errors` and in `warnings`. An image the services refuse (INVALID_ARGUMENT) is raised as is.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from cxr_client.client import AsyncCxrClient
from cxr_client.errors import CxrClientError, InvalidArgumentError
from cxr_client.images import ImageInput, to_image
from cxr_client.references import (
    CANDIDATES_PER_REFERENCE,
    DEFAULT_REFERENCE_FLOOR,
    MAX_CANDIDATES,
    finding_query,
    select_references,
)
from cxr_protos.classification.v1 import classification_service_pb2 as cls_pb
from cxr_protos.common.v1 import common_pb2
from cxr_protos.segmentation.v1 import segmentation_service_pb2 as seg_pb

DISCLAIMER = (
    "Not for diagnosis. This report is produced by research software for engineering and evaluation "
    "purposes. It is not a medical device, has not been clinically validated, and must not be used to "
    "make clinical decisions; every finding needs review by a qualified radiologist."
)
UNTRAINED_WARNING = (
    "UNTRAINED MODEL: at least one model ran without a trained checkpoint (random weights); its "
    "probabilities, masks and measurements are meaningless."
)
NEGATIVE_LABELS = frozenset({"normal", "no finding", "no_finding", "nofinding"})
CTR_CARDIOMEGALY = 0.5
UNTRAINED_MEASUREMENT = "measured on the masks of an untrained model (random weights): not interpretable"
# SegmentImageResponse.spacing_source -> where the mm values come from, in words.
_SPACING_SOURCE = {
    "SPACING_SOURCE_PIXEL_SPACING": "DICOM PixelSpacing (in the patient)",
    "SPACING_SOURCE_IMAGER_PIXEL_SPACING_CORRECTED": (
        "DICOM ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor"
    ),
    "SPACING_SOURCE_IMAGER_PIXEL_SPACING_UNCORRECTED": (
        "DICOM ImagerPixelSpacing, at the detector (no magnification factor in the file: larger than in the patient)"
    ),
}


class ModelVersion(BaseModel):
    service: str
    name: str
    version: str
    architecture: str = ""
    untrained: bool = False
    device: str = ""
    precision: str = ""  # float32, or bfloat16/float16 under AMP


NO_OPERATING_POINT = "no_operating_point"


class ReportFinding(BaseModel):
    label: str
    probability: float
    threshold: float | None  # None: no threshold applies (a label without an operating point)
    positive: bool
    model: str
    calibration: str = ""  # raw, operating_point, no_operating_point; "" from servers that do not say


def finding_threshold(f: cls_pb.Finding) -> float | None:
    """The finding's threshold, or None where the server sent NaN (no threshold applies)."""
    t = float(f.threshold)
    return None if math.isnan(t) else round(t, 4)


def finding_calibration(f: cls_pb.Finding) -> str:
    """`Finding.calibration` as a short name ("" when unspecified)."""
    if f.calibration == cls_pb.CALIBRATION_UNSPECIFIED:
        return ""
    return cls_pb.Calibration.Name(f.calibration).removeprefix("CALIBRATION_").lower()


class Measurements(BaseModel):
    cardiothoracic_ratio: float | None = None
    cardiothoracic_ratio_unavailable_reason: str = ""
    cardiothoracic_ratio_implausible: bool = False
    heart_width_px: float = 0.0
    thorax_width_px: float = 0.0
    heart_width_mm: float = 0.0
    thorax_width_mm: float = 0.0
    spacing_source: str = ""  # where the mm values come from; empty: no mm values
    note: str = ""


class AnatomyStructure(BaseModel):
    label: str
    area_pixels: int
    area_mm2: float = 0.0


class LiteratureReference(BaseModel):
    number: int
    finding: str
    title: str
    source: str
    passage_id: str  # the document's best-matching chunk
    score: float  # its cosine similarity to the finding's query
    excerpt: str
    chunks: int = 1  # chunks of this document among the passages retrieved for the finding
    also_for: list[str] = Field(default_factory=list)  # later findings this document is a reference for too


class StudyReport(BaseModel):
    study: str
    generated_at: str
    image: dict[str, Any] = Field(default_factory=dict)
    findings: list[ReportFinding] = Field(default_factory=list)
    positive_findings: list[str] = Field(default_factory=list)
    measurements: Measurements | None = None
    anatomy: list[AnatomyStructure] = Field(default_factory=list)
    literature: list[LiteratureReference] = Field(default_factory=list)
    # finding -> why it has no reference (nothing scored above the relevance floor)
    literature_notes: dict[str, str] = Field(default_factory=dict)
    models: list[ModelVersion] = Field(default_factory=list)
    untrained: bool = False
    warnings: list[str] = Field(default_factory=list)
    errors: dict[str, str] = Field(default_factory=dict)
    disclaimer: str = DISCLAIMER
    overlay_png: bytes | None = Field(default=None, exclude=True, repr=False)
    heatmaps: dict[str, bytes] = Field(default_factory=dict, exclude=True, repr=False)


def _model_version(service: str, info: common_pb2.ModelInfo) -> ModelVersion:
    return ModelVersion(
        service=service,
        name=info.name,
        version=info.version,
        architecture=info.architecture,
        untrained=info.untrained,
        device=info.device,
        precision=info.precision,
    )


def literature_query(label: str) -> str:
    return finding_query(label)


def _is_reportable(f: ReportFinding) -> bool:
    return f.positive and f.label.strip().lower() not in NEGATIVE_LABELS


async def analyze_study(
    client: AsyncCxrClient,
    image: ImageInput,
    *,
    study: str | None = None,
    top_k: int = 3,
    max_findings_searched: int = 5,
    include_overlay: bool = True,
    literature: bool = True,
    heatmaps: bool = False,
    timeout: float | None = None,
    reference_floor: float = DEFAULT_REFERENCE_FLOOR,
) -> StudyReport:
    """Classify and segment one image, search the literature for its positive findings, report.

    With `heatmaps`, a second classification call asks for Grad-CAM heatmaps of the positive
    findings searched (one backward pass each); they go to `report.heatmaps` (label -> PNG)."""
    img = to_image(image)
    name = study or (Path(image).name if isinstance(image, str | Path) else "study")
    report = StudyReport(study=name, generated_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    cls_res, seg_res = await asyncio.gather(
        client.classify(img, timeout=timeout),
        client.segment(img, mask_encoding="none", include_overlay=include_overlay, timeout=timeout),
        return_exceptions=True,
    )
    for res in (cls_res, seg_res):
        if isinstance(res, InvalidArgumentError):
            raise res
        if isinstance(res, BaseException) and not isinstance(res, CxrClientError):
            raise res
    if isinstance(cls_res, CxrClientError) and isinstance(seg_res, CxrClientError):
        raise cls_res

    if isinstance(cls_res, BaseException):
        report.errors["classification"] = str(cls_res)
    else:
        report.image = _image_dict(cls_res.image)
        for pred in cls_res.predictions:
            report.models.append(_model_version("classification", pred.model))
            report.findings.extend(
                ReportFinding(
                    label=f.label,
                    probability=round(float(f.probability), 4),
                    threshold=finding_threshold(f),
                    positive=f.positive,
                    model=pred.model.name,
                    calibration=finding_calibration(f),
                )
                for f in pred.findings
            )
        report.findings.sort(key=lambda f: f.probability, reverse=True)
        report.positive_findings = [f.label for f in report.findings if _is_reportable(f)]

    if isinstance(seg_res, BaseException):
        report.errors["segmentation"] = str(seg_res)
    else:
        report.models.append(_model_version("segmentation", seg_res.model))
        report.image = report.image or _image_dict(seg_res.image)
        report.measurements = _measurements(
            seg_res.measurements,
            untrained=seg_res.untrained or seg_res.model.untrained,
            spacing_source=seg_pb.SpacingSource.Name(seg_res.spacing_source),
            magnification_factor=seg_res.magnification_factor,
        )
        report.anatomy = [
            AnatomyStructure(label=m.label, area_pixels=m.area_pixels, area_mm2=round(m.area_mm2, 1))
            for m in seg_res.masks
        ]
        report.overlay_png = seg_res.overlay_png or None

    jobs = []
    if literature and report.positive_findings:
        jobs.append(_add_literature(client, report, top_k, max_findings_searched, timeout, reference_floor))
    if heatmaps and report.positive_findings:
        jobs.append(_add_heatmaps(client, img, report, max_findings_searched, timeout))
    await asyncio.gather(*jobs)

    report.untrained = any(m.untrained for m in report.models)
    if report.untrained:
        report.warnings.insert(0, UNTRAINED_WARNING)
    for service, message in report.errors.items():
        report.warnings.append(f"{service} failed, its part of the report is missing: {message}")
    return report


async def _add_literature(
    client: AsyncCxrClient,
    report: StudyReport,
    top_k: int,
    max_findings: int,
    timeout: float | None,
    floor: float = DEFAULT_REFERENCE_FLOOR,
) -> None:
    """Up to `top_k` documents per finding, none below `floor`; a document found for several findings is
    one reference (numbered once, `also_for` naming the later findings)."""
    labels = report.positive_findings[:max_findings]
    wanted = min(MAX_CANDIDATES, max(top_k, 1) * CANDIDATES_PER_REFERENCE)
    results = await asyncio.gather(
        *(
            client.search_literature(literature_query(label), top_k=wanted, mode="dense", timeout=timeout)
            for label in labels
        ),
        return_exceptions=True,
    )
    cited: dict[str, LiteratureReference] = {}  # document -> its one reference in the report
    for label, res in zip(labels, results, strict=True):
        if isinstance(res, CxrClientError):
            report.errors["rag"] = str(res)
            continue
        if isinstance(res, BaseException):
            raise res
        chosen, best = select_references(res.passages, top_k, floor)
        if not chosen:
            seen = "nothing retrieved" if best is None else f"best similarity {best:.2f}"
            report.literature_notes[label] = f"no reference above the relevance floor {floor:.2f} ({seen})"
        for hit in chosen:
            if hit.key in cited:
                cited[hit.key].also_for.append(label)
                continue
            p = hit.passage
            ref = LiteratureReference(
                number=len(report.literature) + 1,
                finding=label,
                title=p.title,
                source=p.source,
                passage_id=p.id,
                score=round(hit.score, 4),
                excerpt=_excerpt(p.text),
                chunks=hit.chunks,
            )
            cited[hit.key] = ref
            report.literature.append(ref)
    if len(report.positive_findings) > max_findings:
        report.warnings.append(
            f"literature searched for the {max_findings} most probable positive findings only "
            f"(of {len(report.positive_findings)})"
        )


async def _add_heatmaps(
    client: AsyncCxrClient, img: common_pb2.Image, report: StudyReport, max_findings: int, timeout: float | None
) -> None:
    labels = report.positive_findings[:max_findings]
    models = sorted({f.model for f in report.findings if f.label in labels})
    try:
        resp = await client.classify(img, model_names=models, heatmap_labels=labels, timeout=timeout)
    except CxrClientError as err:
        report.warnings.append(f"heatmaps unavailable: {err}")
        return
    for pred in resp.predictions:
        for f in pred.findings:
            if f.heatmap_png and f.label in labels:
                report.heatmaps[f.label] = f.heatmap_png


def _excerpt(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + "…"


def _image_dict(meta: common_pb2.ImageMetadata) -> dict[str, Any]:
    out: dict[str, Any] = {"width": meta.width, "height": meta.height, "format": meta.format}
    if meta.pixel_spacing_row_mm:
        out["pixel_spacing_mm"] = [meta.pixel_spacing_row_mm, meta.pixel_spacing_column_mm]
    if meta.photometric_interpretation:
        out["photometric_interpretation"] = meta.photometric_interpretation
    return out


def _measurements(
    m: Any, *, untrained: bool = False, spacing_source: str = "", magnification_factor: float = 0.0
) -> Measurements:
    """The segmentation measurements for the report: a ratio outside (0, 1) is never reported as a value, and
    an untrained model's ratio is never read against the cardiomegaly cut-off."""
    ratio = float(m.cardiothoracic_ratio)
    implausible = bool(m.cardiothoracic_ratio_implausible) or not (ratio == 0.0 or 0.0 < ratio < 1.0)
    reason = m.cardiothoracic_ratio_unavailable_reason
    if implausible and not m.cardiothoracic_ratio_implausible:  # a server that does not check it
        reason = f"implausible: a ratio of {ratio:.3f} is outside (0, 1); the masks are wrong"
    ctr = ratio if 0.0 < ratio < 1.0 and not implausible else None
    note = ""
    if ctr is not None:
        if untrained:
            note = UNTRAINED_MEASUREMENT
        elif ctr > CTR_CARDIOMEGALY:
            note = f"CTR {ctr:.2f} is above {CTR_CARDIOMEGALY}, the usual cardiomegaly cut-off on PA radiographs"
        else:
            note = f"CTR {ctr:.2f} is within the usual range (<= {CTR_CARDIOMEGALY} on PA radiographs)"
    source = _SPACING_SOURCE.get(spacing_source, "")
    if source and magnification_factor:
        source += f" {magnification_factor:g}"
    return Measurements(
        cardiothoracic_ratio=round(ctr, 4) if ctr is not None else None,
        cardiothoracic_ratio_unavailable_reason=reason,
        cardiothoracic_ratio_implausible=implausible,
        heart_width_px=round(m.heart_width_px, 1),
        thorax_width_px=round(m.thorax_width_px, 1),
        heart_width_mm=round(m.heart_width_mm, 1),
        thorax_width_mm=round(m.thorax_width_mm, 1),
        spacing_source=source,
        note=note,
    )
