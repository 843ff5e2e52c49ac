"""cxr_dicom.fhir: the bundle validates (fhir.resources R4B), carries the right codes, values and references."""

from __future__ import annotations

import copy
import json
import os

import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from cxr_dicom.fhir import (
    IDENTIFIER_SYSTEM,
    build_bundle,
    report_identifier,
    validate_bundle,
    write_bundle,
)
from cxr_dicom.results import NOT_FOR_DIAGNOSTIC_USE, Algorithm, AlgorithmResult, Finding, Measurement
from cxr_dicom.sr import device_uid
from tests.support.paths import DICOM_DIR

SOURCE = DICOM_DIR / "siim-cxr-mono2-jpeg-baseline.dcm"
CLASSIFIER = Algorithm("densenet121-res224-nih", "1.2.0", "9f2c" * 16, untrained=True)
SEGMENTER = Algorithm("cxr-unet-anatomy", "0.3.1", "a1b2" * 16)
FINDINGS = (Finding("Effusion", 0.81, 0.5, True), Finding("Hernia", 0.02, 0.4, False))
MEASUREMENTS = (Measurement("cardiothoracic_ratio", 0.47, "1"), Measurement("right_lung_area", 20480.0, "mm2"))
RESULTS = (AlgorithmResult(CLASSIFIER, FINDINGS), AlgorithmResult(SEGMENTER, (), MEASUREMENTS))


@pytest.fixture(scope="module")
def source():
    return pydicom.dcmread(SOURCE, stop_before_pixels=True)


@pytest.fixture(scope="module")
def bundle(source):
    return build_bundle(source, RESULTS)


def resources(bundle, kind):
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def by_full_url(bundle):
    return {e["fullUrl"]: e["resource"] for e in bundle["entry"]}


def test_bundle_is_a_valid_transaction(bundle):
    parsed = Bundle.model_validate(bundle)
    assert parsed.type == "transaction"
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds.count("Observation") == len(FINDINGS) + len(MEASUREMENTS)
    assert kinds.count("Device") == 2 and kinds.count("DiagnosticReport") == 1
    for entry in bundle["entry"]:
        assert entry["fullUrl"].startswith("urn:uuid:")
        request = entry["request"]
        assert request["method"] == "POST" and request["url"] == entry["resource"]["resourceType"]
        identifier = entry["resource"]["identifier"][-1] if entry["resource"]["resourceType"] == "Device" else None
        ident = identifier or entry["resource"]["identifier"][0]
        assert request["ifNoneExist"] == f"identifier={IDENTIFIER_SYSTEM}|{ident['value']}"


def test_report_references_every_observation_and_the_study(bundle, source):
    [report] = resources(bundle, "DiagnosticReport")
    DiagnosticReport.model_validate(report)
    assert report["status"] == "preliminary"
    assert report["code"]["coding"][0] == {"system": "http://loinc.org", "code": "43468-8", "display": "X-Ray Report"}
    assert report["category"][0]["coding"][0]["code"] == "RAD"
    urls = by_full_url(bundle)
    results = [urls[r["reference"]] for r in report["result"]]
    assert [r["resourceType"] for r in results] == ["Observation"] * 4
    assert report["imagingStudy"][0]["identifier"] == {
        "system": "urn:dicom:uid",
        "value": f"urn:oid:{source.StudyInstanceUID}",
    }
    assert str(source.SOPInstanceUID) in report["imagingStudy"][0]["display"]
    assert (
        report["conclusion"].startswith(NOT_FOR_DIAGNOSTIC_USE)
        and "Positive findings: Effusion." in report["conclusion"]
    )
    assert "subject" not in report  # nothing about the patient from the DICOM


def test_finding_observations_code_value_probability_threshold_device(bundle, source):
    urls = by_full_url(bundle)
    findings = [o for o in resources(bundle, "Observation") if "valueCodeableConcept" in o]
    assert len(findings) == 2
    effusion, hernia = findings
    Observation.model_validate(effusion)
    assert effusion["code"]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "60046008",
        "display": "Pleural effusion",
    }
    assert effusion["code"]["text"] == "Effusion"
    assert (
        hernia["code"]["coding"][0]["system"] == "urn:cxr:codesystem:results"
        and hernia["code"]["coding"][0]["code"] == "Hernia"
    )
    assert effusion["valueCodeableConcept"]["coding"][0]["code"] == "52101004"  # Present
    assert hernia["valueCodeableConcept"]["coding"][0]["code"] == "272519000"  # Absent
    for obs, finding in zip(findings, FINDINGS, strict=True):
        components = {c["code"]["coding"][0]["code"]: c["valueQuantity"] for c in obs["component"]}
        assert components["122157"] == {
            "value": finding.probability,
            "unit": "no units",
            "system": "http://unitsofmeasure.org",
            "code": "1",
        }
        assert components["122411"]["value"] == finding.threshold
        device = urls[obs["device"]["reference"]]
        assert device["resourceType"] == "Device"
        assert device["identifier"][0]["value"] == f"urn:oid:{device_uid(CLASSIFIER)}"
        assert device["deviceName"][0] == {"name": CLASSIFIER.name, "type": "model-name"}
        assert obs["derivedFrom"][0]["identifier"]["value"] == f"urn:oid:{source.StudyInstanceUID}"
        assert obs["note"][0]["text"].startswith(NOT_FOR_DIAGNOSTIC_USE)  # the classifier is untrained
        assert obs["status"] == "preliminary" and obs["category"][0]["coding"][0]["code"] == "imaging"


def test_measurement_observations_are_ucum_quantities_with_body_site(bundle):
    measurements = [o for o in resources(bundle, "Observation") if "valueQuantity" in o]
    ctr, lung = measurements
    assert ctr["code"]["coding"][0]["code"] == "cardiothoracic_ratio" and ctr["valueQuantity"]["value"] == 0.47
    assert ctr["valueQuantity"]["code"] == "1" and "bodySite" not in ctr
    assert lung["code"]["coding"][0] == {"system": "http://snomed.info/sct", "code": "42798000", "display": "Area"}
    assert lung["valueQuantity"] == {
        "value": 20480.0,
        "unit": "square millimeter",
        "system": "http://unitsofmeasure.org",
        "code": "mm2",
    }
    assert [c["code"] for c in lung["bodySite"]["coding"]] == ["39607008", "24028007"]  # lung, right
    assert "note" not in lung  # the segmenter is trained


def test_same_results_give_the_same_bundle_so_a_resend_creates_nothing(source, bundle):
    again = build_bundle(source, RESULTS)
    assert again == bundle
    other = build_bundle(source, (AlgorithmResult(Algorithm(CLASSIFIER.name, "1.2.0", "0" * 64), FINDINGS),))
    assert report_identifier(other) != report_identifier(bundle)


def test_subject_is_passed_through_when_given(source):
    bundle = build_bundle(source, RESULTS, subject={"reference": "Patient/123"})
    assert all(r["subject"] == {"reference": "Patient/123"} for r in resources(bundle, "Observation"))
    assert resources(bundle, "DiagnosticReport")[0]["subject"] == {"reference": "Patient/123"}


def test_validation_refuses_broken_bundles(bundle):
    no_code = copy.deepcopy(bundle)
    del resources(no_code, "Observation")[0]["code"]
    with pytest.raises(ValueError, match="invalid FHIR bundle"):
        validate_bundle(no_code)
    bad_status = copy.deepcopy(bundle)
    resources(bad_status, "DiagnosticReport")[0]["status"] = "done"
    with pytest.raises(ValueError, match="status"):
        validate_bundle(bad_status)
    wrong_type = copy.deepcopy(bundle)
    resources(wrong_type, "Observation")[0]["valueQuantity"] = {"value": "not a number"}
    with pytest.raises(ValueError):
        validate_bundle(wrong_type)
    with pytest.raises(ValueError):
        build_bundle(pydicom.dcmread(SOURCE, stop_before_pixels=True), ())


def test_write_bundle_is_atomic_and_readable(bundle, tmp_path):
    path = write_bundle(bundle, tmp_path / "fhir")
    assert path.parent == tmp_path / "fhir" and path.suffix == ".json"
    assert json.loads(path.read_text()) == bundle
    # compact JSON (no indentation: Python's C encoder), keys sorted
    assert path.read_bytes() == json.dumps(bundle, sort_keys=True, separators=(",", ":")).encode()
    assert write_bundle(bundle, tmp_path / "fhir") == path  # same report, same file, replaced whole
    assert os.listdir(tmp_path / "fhir") == [path.name]  # no temporary file left behind
    Bundle.model_validate_json(path.read_bytes())
