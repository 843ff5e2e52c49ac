"""cxr_dicom.worker.build_results: the SR's and the SEG's UIDs are fixed by the source image and the algorithms,
so a retried analysis sends the same objects (a PACS keeps one of each) and new weights or a new version new ones.

The SEG is the segmentation service's own (cxr_segmentation.dicom_seg), which draws random UIDs."""

from __future__ import annotations

import io
import re

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from cxr_dicom.results import Algorithm, AlgorithmResult, Finding, Measurement
from cxr_dicom.worker import build_results
from tests.support.paths import DICOM_DIR

SOURCE = DICOM_DIR / "nih-dx-mono2-8bit.dcm"
CLASSIFIER = Algorithm("binary_classifier", "3f1e9c", "3f1e9c", untrained=True)
SEGMENTER = Algorithm("segmentation", "77ab01", "77ab01", untrained=True)
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def results(
    classifier: Algorithm = CLASSIFIER, segmenter: Algorithm = SEGMENTER, threshold: float = 0.5
) -> list[AlgorithmResult]:
    return [
        AlgorithmResult(classifier, findings=(Finding("Effusion", 0.7, threshold, 0.7 >= threshold),)),
        AlgorithmResult(segmenter, measurements=(Measurement("cardiothoracic_ratio", 0.48, "1"),)),
    ]


@pytest.fixture(scope="module")
def source_bytes() -> bytes:
    return SOURCE.read_bytes()


def seg_bytes(data: bytes) -> bytes:
    """A fresh SEG from the segmentation service's builder: new random UIDs on every call, as on every attempt."""
    from cxr_segmentation.dicom_seg import build_dicom_seg

    source = pydicom.dcmread(io.BytesIO(data))
    masks = np.zeros((1, int(source.Rows), int(source.Columns)), dtype=bool)
    masks[0, 50:150, 60:160] = True
    return build_dicom_seg(source, masks, ["heart"], algorithm_name=SEGMENTER.name, algorithm_version="77ab01")


def uids(data: bytes, algorithm_results: list[AlgorithmResult]) -> dict[str, tuple[str, str, str]]:
    """Modality -> (Series Instance UID, SOP Instance UID, file meta Media Storage SOP Instance UID)."""
    datasets, _ = build_results(data, algorithm_results, seg_bytes(data))
    out = {}
    for ds in datasets:
        encoded = io.BytesIO()
        ds.save_as(encoded, enforce_file_format=True)
        back = pydicom.dcmread(io.BytesIO(encoded.getvalue()))
        out[str(back.Modality)] = (
            str(back.SeriesInstanceUID),
            str(back.SOPInstanceUID),
            str(back.file_meta.MediaStorageSOPInstanceUID),
        )
    return out


def test_a_retry_builds_the_same_sr_and_seg_uids_valid_and_consistent_with_the_file_meta(source_bytes):
    first = uids(source_bytes, results())
    again = uids(source_bytes, results())
    assert sorted(first) == ["SEG", "SR"]
    assert again == first  # the SEG bytes differ (random UIDs from the segmentation service); ours do not
    source = pydicom.dcmread(io.BytesIO(source_bytes), stop_before_pixels=True)
    every = [uid for triple in first.values() for uid in triple]
    for uid in every:
        assert len(uid) <= 64 and _UID.match(uid) and UID(uid).is_valid, uid
    for series, sop, media in first.values():
        assert sop == media  # the file meta names the same instance
        assert series != source.SeriesInstanceUID and sop != source.SOPInstanceUID
    assert len({first["SEG"][0], first["SR"][0], first["SEG"][1], first["SR"][1]}) == 4


def test_a_new_version_or_checkpoint_gives_new_uids(source_bytes):
    first = uids(source_bytes, results())
    new_version = Algorithm(SEGMENTER.name, "77ab02", SEGMENTER.checkpoint_hash, untrained=True)
    new_weights = Algorithm(SEGMENTER.name, SEGMENTER.version, "0" * 64, untrained=True)
    for segmenter in (new_version, new_weights):
        other = uids(source_bytes, results(segmenter=segmenter))
        assert other["SEG"][1] != first["SEG"][1] and other["SR"][1] != first["SR"][1]
    # a new classifier changes the SR (it carries its findings), not the SEG (it does not)
    new_classifier = uids(source_bytes, results(classifier=Algorithm(CLASSIFIER.name, "9", "9", untrained=True)))
    assert new_classifier["SR"][1] != first["SR"][1] and new_classifier["SEG"] == first["SEG"]


def test_another_source_image_gives_other_uids(source_bytes):
    ds = pydicom.dcmread(io.BytesIO(source_bytes))
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    first, other = uids(source_bytes, results()), uids(buf.getvalue(), results())
    assert other["SEG"][1] != first["SEG"][1] and other["SR"][1] != first["SR"][1]
    assert other["SEG"][0] == first["SEG"][0]  # same study, same algorithms: the same results series


def test_new_thresholds_give_a_new_sr_and_the_same_seg(source_bytes):
    """Another operating point changes the SR's decisions: a PACS must not keep the first SR as the same object."""
    first, other = uids(source_bytes, results()), uids(source_bytes, results(threshold=0.8))
    assert other["SR"][1] != first["SR"][1] and other["SEG"] == first["SEG"]
    assert uids(source_bytes, results(threshold=0.8)) == other


def fhir_keys(data: bytes, algorithm_results: list[AlgorithmResult]) -> dict[str, tuple[str, str, str]]:
    """Observation/DiagnosticReport code text (or type) -> (identifier, fullUrl, ifNoneExist) of the bundle."""
    _, bundle = build_results(data, algorithm_results, b"")
    out = {}
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] in ("Observation", "DiagnosticReport"):
            name = resource["code"]["text"] if resource["resourceType"] == "Observation" else "report"
            out[name] = (resource["identifier"][0]["value"], entry["fullUrl"], entry["request"]["ifNoneExist"])
    return out


def test_new_thresholds_give_new_fhir_identifiers_and_a_retry_the_same(source_bytes):
    """The FHIR keys follow the SR's identity: after new thresholds a conditional create (ifNoneExist) must not
    match the resources of the old decisions; a retry must match its own."""
    first = fhir_keys(source_bytes, results())
    assert sorted(first) == ["Effusion", "cardiothoracic_ratio", "report"]
    assert fhir_keys(source_bytes, results()) == first  # a retry
    other = fhir_keys(source_bytes, results(threshold=0.8))
    for name in ("Effusion", "report"):  # the classifier's decisions and the report that lists them
        assert all(a != b for a, b in zip(other[name], first[name], strict=True)), name
    assert other["cardiothoracic_ratio"] == first["cardiothoracic_ratio"]  # the segmenter has no thresholds
    new_version = Algorithm(SEGMENTER.name, "77ab02", SEGMENTER.checkpoint_hash, untrained=True)
    assert (
        fhir_keys(source_bytes, results(segmenter=new_version))["cardiothoracic_ratio"][0]
        != (first["cardiothoracic_ratio"][0])
    )
    for identifier, _, if_none_exist in first.values():
        assert "#" not in if_none_exist and "+" not in if_none_exist and " " not in if_none_exist
        assert if_none_exist.endswith("|" + identifier)


def test_a_seg_built_from_the_anonymized_copy_goes_back_under_the_source_patient_and_study(source_bytes):
    """With security.anonymize_dicom the segmentation service builds its SEG from an anonymized copy; the SEG
    the node sends carries the original's patient and study attributes, and so does the SR."""
    from cxr_dicom.worker import analysis_copy

    original = pydicom.dcmread(io.BytesIO(source_bytes))
    original.PatientName, original.PatientID = "Doe^Janet", "PID-4711"
    original.AccessionNumber, original.PatientBirthDate, original.StudyID = "ACC-1", "19610203", "S-9"
    buf = io.BytesIO()
    original.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    copy = analysis_copy(data)
    anonymous = pydicom.dcmread(io.BytesIO(copy))
    assert anonymous.PatientID == "ANONYMIZED" and b"PID-4711" not in copy and b"ACC-1" not in copy
    datasets, _ = build_results(data, results(), seg_bytes(copy))
    by_modality = {str(ds.Modality): ds for ds in datasets}
    assert sorted(by_modality) == ["SEG", "SR"]
    for ds in by_modality.values():
        for keyword in ("PatientName", "PatientID", "AccessionNumber", "PatientBirthDate", "StudyID", "StudyDate"):
            assert ds.get(keyword) == original.get(keyword), (ds.Modality, keyword)
        assert ds.StudyInstanceUID == original.StudyInstanceUID
