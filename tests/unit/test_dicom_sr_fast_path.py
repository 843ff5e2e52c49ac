"""cxr_dicom.sr.build_sr's fast ComprehensiveSR construction gives the SR highdicom's own constructor gives, for
different sources and models, and nothing of one study's SR turns up in the next one's."""

from __future__ import annotations

import highdicom as hd
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO

from cxr_dicom import sr as sr_module
from cxr_dicom.results import Algorithm, AlgorithmResult, Finding, Measurement
from cxr_dicom.sr import build_sr, sr_bytes
from tests.support.paths import DICOM_DIR

TRACKING_UID = "112040"  # DCM "Tracking Unique Identifier": a new random UID per group and build
CLOCK = ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime")

A_RESULTS = (
    AlgorithmResult(
        Algorithm("densenet121-res224-nih", "1.2.0", "9f2c" * 16, untrained=True),
        (Finding("Effusion", 0.81, 0.5, True), Finding("Pleural_Thickening", 0.12, 0.35, False)),
    ),
    AlgorithmResult(
        Algorithm("cxr-unet-anatomy", "0.3.1", "a1b2" * 16),
        (),
        (Measurement("cardiothoracic_ratio", 0.47, "1"), Measurement("heart_area", 10234.5, "mm2")),
    ),
)
B_RESULTS = (
    AlgorithmResult(
        Algorithm("swin-nih", "7.0", "0c0d" * 16),
        (Finding("Mass", 0.2, 0.6, False), Finding("Nodule", 0.9, 0.3, True), Finding("Edema", 0.4, 0.4, True)),
    ),
    AlgorithmResult(
        Algorithm("unet-lungs", "2.1", "e5f6" * 16, untrained=True),
        (),
        (Measurement("left_lung_area", 20480.0, "mm2"), Measurement("thorax_width", 280.5, "mm")),
    ),
)
STUDIES = {
    "A": (DICOM_DIR / "nih-dx-mono2-8bit.dcm", A_RESULTS),
    "B": (DICOM_DIR / "siim-cxr-mono2-jpeg-baseline.dcm", B_RESULTS),
}


def build(name: str) -> bytes:
    path, results = STUDIES[name]
    source = pydicom.dcmread(path)
    return sr_bytes(build_sr(source, results, series_instance_uid=f"2.25.{len(name)}1", sop_instance_uid="2.25.12"))


def straightforward(content, **kwargs):
    return hd.sr.ComprehensiveSR(content=content, **kwargs)


def normalized(data: bytes) -> dict:
    """The SR as DICOM JSON without what differs between two builds of the same results: the clock (creation
    and content date and time, the contribution time of the source's equipment) and the tracking UIDs (random
    per build)."""
    ds = pydicom.dcmread(DicomBytesIO(data))
    for keyword in CLOCK:
        assert keyword in ds
        delattr(ds, keyword)
    stamped = [item for item in ds.ContributingEquipmentSequence if "ContributionDateTime" in item]
    assert stamped  # highdicom's item for the source's equipment, stamped now
    for item in stamped:
        del item.ContributionDateTime
    tracking = 0

    def walk(items):
        nonlocal tracking
        for item in items:
            if item.ValueType == "UIDREF" and item.ConceptNameCodeSequence[0].CodeValue == TRACKING_UID:
                item.UID = "2.25.0"
                tracking += 1
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    assert tracking > 0
    meta = {str(e.tag): str(e.value) for e in ds.file_meta}
    return {"meta": meta, "dataset": ds.to_json_dict()}


@pytest.fixture
def reference(monkeypatch) -> dict[str, dict]:
    """Each study's SR through highdicom's ComprehensiveSR constructor on the whole content tree."""
    with monkeypatch.context() as patch:
        patch.setattr(sr_module, "_comprehensive_sr", straightforward)
        return {name: normalized(build(name)) for name in STUDIES}


def test_the_fast_sr_equals_highdicoms_own_for_two_sources_and_models_in_any_order(reference):
    assert reference["A"] != reference["B"]
    a_first = build("A")
    b = build("B")
    a_again = build("A")
    assert normalized(a_first) == reference["A"]
    assert normalized(b) == reference["B"]
    assert normalized(a_again) == reference["A"]
    source_a = pydicom.dcmread(STUDIES["A"][0], stop_before_pixels=True)
    for value in (source_a.SOPInstanceUID, source_a.SeriesInstanceUID, source_a.StudyInstanceUID, "densenet121"):
        assert value.encode() in a_first and value.encode() not in b
    assert b"swin-nih" in b and b"swin-nih" not in a_again


def test_the_fast_srs_highdicom_content_is_the_tree_it_carries():
    path, results = STUDIES["B"]
    sr = build_sr(pydicom.dcmread(path), results)
    [root] = sr.content
    assert isinstance(root, hd.sr.ContainerContentItem)
    assert len(root.ContentSequence) == len(sr.ContentSequence) > 0
    assert all(a is b for a, b in zip(root.ContentSequence, sr.ContentSequence, strict=True))
