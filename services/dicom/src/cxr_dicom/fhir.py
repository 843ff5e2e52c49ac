"""FHIR results for the EHR: a DiagnosticReport with one Observation per finding and per measurement, in a
transaction Bundle, validated with ``fhir.resources``, written to a folder or POSTed to a FHIR server.

FHIR version: R4 is what hospitals run; fhir.resources 8 ships R5 (its default package), R4B (4.3.0) and
STU3, but not R4. R4B differs from R4 only in resources this module does not use (medication definition,
evidence, subscriptions); DiagnosticReport, Observation, ImagingStudy, Device and Bundle are the same, so the
bundle is validated with ``fhir.resources.R4B`` and is valid R4. fhir.resources checks structure and types,
not code bindings, so the status codes below are R4's required values, set here and tested.

Contents (codes in `cxr_dicom.codes`, which says which are SNOMED CT / DICOM and which are local):

- The source study is a logical reference to its ImagingStudy by Study Instance UID (``urn:oid:``): the
  hospital's imaging feed owns that resource and its patient. Every Observation is ``derivedFrom`` it and
  the DiagnosticReport's ``imagingStudy`` names it.
- Device per algorithm: identifier = the same Device UID as the DICOM Contributing Equipment item, model
  name, version and checkpoint hash, and the model card's REST path as a ``property`` (type text
  ``model-card``: R4 Device has no element for a model card); every Observation names its ``device``.
- Observation per finding: code = the finding, value = Present/Absent, components = probability (DCM
  122157) and threshold (DCM 122411) as UCUM ``1`` quantities. Per measurement: code = the quantity,
  bodySite = the anatomy, value = a UCUM quantity.
- DiagnosticReport (category RAD, code LOINC 43468-8 "X-Ray Report" as published in DICOM PS3.16) with the
  observations as ``result`` and a conclusion listing the positive findings.
- Validation: the first bundle of each shape (algorithms, labels, measurement names and units, subject) in full;
  a later one of that shape is validated in full too unless its other values are finite numbers and DICOM UIDs.

Status is ``preliminary`` everywhere: a model's output is not a signed report until a radiologist verifies
it. When a model is untrained, every resource from it carries "NOT FOR DIAGNOSTIC USE" in a note (the
DiagnosticReport in its conclusion). No patient data is taken from the DICOM: the EHR links the report to its
patient through the study, or the caller passes the patient Reference it has. Identifiers and fullUrls are
name-based UUIDs of the image and the algorithm identity the SR's UIDs follow (device UID, version,
operating thresholds), and each entry is a conditional create (``ifNoneExist``), so sending the same results
twice creates nothing new while new weights, a new version or new thresholds create new resources.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
from pydicom import Dataset

from cxr_dicom.codes import (
    ABSENT,
    PRESENT,
    PROBABILITY,
    THRESHOLD,
    Concept,
    finding_concept,
    measurement_concept,
    unit_concept,
)
from cxr_dicom.results import NOT_FOR_DIAGNOSTIC_USE, Algorithm, AlgorithmResult, untrained_notice
from cxr_dicom.sr import algorithm_identity, device_uid

FHIR_VERSION = "4.0.1"  # what the bundle claims to be; validated with fhir.resources.R4B (see above)
IDENTIFIER_SYSTEM = "urn:cxr:result"
MODEL_CARD_PROPERTY = "model-card"  # Device.property type text; its value is the card's REST path
DICOM_UID_SYSTEM = "urn:dicom:uid"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
XRAY_REPORT = Concept("LN", "43468-8", "X-Ray Report")
STATUS = "preliminary"
# R4 required bindings fhir.resources does not enforce.
OBSERVATION_STATUSES = frozenset(
    {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"}
)
REPORT_STATUSES = frozenset(
    {
        "registered",
        "partial",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "appended",
        "cancelled",
        "entered-in-error",
        "unknown",
    }
)


class FhirPostError(RuntimeError):
    """The FHIR server did not accept the bundle (HTTP status and the start of its answer)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"FHIR server answered HTTP {status}: {body[:200]}")
        self.status = status
        self.body = body


def _coding(concept: Concept) -> dict[str, str]:
    return {"system": concept.fhir_system, "code": concept.code, "display": concept.meaning}


def _codeable(concept: Concept, text: str | None = None) -> dict[str, Any]:
    return {"coding": [_coding(concept)], "text": text or concept.meaning}


def _quantity(value: float, unit: str) -> dict[str, Any]:
    ucum = unit_concept(unit)
    return {"value": float(value), "unit": ucum.meaning, "system": ucum.fhir_system, "code": ucum.code}


def _uuid(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxr:fhir:" + "/".join(parts)))


def _entry(resource: dict[str, Any], resource_id: str, identifier: str) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{resource_id}",
        "resource": resource,
        "request": {
            "method": "POST",
            "url": resource["resourceType"],
            "ifNoneExist": f"identifier={IDENTIFIER_SYSTEM}|{identifier}",
        },
    }


def _device(algorithm: Algorithm) -> tuple[str, dict[str, Any]]:
    uid = device_uid(algorithm)
    resource: dict[str, Any] = {
        "resourceType": "Device",
        "identifier": [
            {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"},
            {"system": IDENTIFIER_SYSTEM, "value": f"device/{uid}"},
        ],
        "manufacturer": algorithm.manufacturer,
        "deviceName": [{"name": algorithm.name, "type": "model-name"}],
        "version": [{"value": algorithm.version}, {"value": f"checkpoint {algorithm.checkpoint_hash}"}],
    }
    if algorithm.untrained:
        resource["note"] = [{"text": f"{NOT_FOR_DIAGNOSTIC_USE}: untrained model"}]
    if algorithm.model_card:  # R4 Device.property: a typed, text-only value (no code system names a model card)
        resource["property"] = [{"type": {"text": MODEL_CARD_PROPERTY}, "valueCode": [{"text": algorithm.model_card}]}]
    return _uuid("device", uid), resource


def _study_reference(source: Dataset) -> dict[str, Any]:
    """A logical reference to the study's ImagingStudy by Study Instance UID: the hospital's imaging feed owns
    that resource (and its patient link); the node only names it."""
    return {
        "type": "ImagingStudy",
        "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{source.StudyInstanceUID}"},
        "display": f"SOP Instance {source.SOPInstanceUID} of series {source.SeriesInstanceUID}",
    }


def build_bundle(
    source: Dataset, results: Sequence[AlgorithmResult], *, subject: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The transaction Bundle (a JSON-ready dict) of ``results`` about the image ``source``, validated.

    ``subject`` is the patient Reference when the caller has one from the EHR (never built from DICOM)."""
    if not results:
        raise ValueError("a report needs at least one algorithm result")
    sop_uid = str(source.SOPInstanceUID)
    study_ref = _study_reference(source)
    subject_part = {"subject": dict(subject)} if subject is not None else {}
    entries: list[dict[str, Any]] = []
    observation_refs: list[dict[str, str]] = []
    positives: list[str] = []
    identities = [_uuid("algorithm", identity) for identity in algorithm_identity(results)]
    for result, identity in zip(results, identities, strict=True):
        algorithm = result.algorithm
        device_id, device = _device(algorithm)
        entries.append(_entry(device, device_id, f"device/{device_uid(algorithm)}"))
        notes = [{"text": f"{NOT_FOR_DIAGNOSTIC_USE}: {algorithm.name} is untrained"}] if algorithm.untrained else []
        common: dict[str, Any] = {
            "resourceType": "Observation",
            "status": STATUS,
            "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}],
            **subject_part,
            "device": {"reference": f"urn:uuid:{device_id}"},
            "derivedFrom": [study_ref],
            **({"note": notes} if notes else {}),
        }
        for finding in result.findings:
            key = f"{sop_uid}/{identity}/finding/{finding.label}"
            obs_id = _uuid("observation", key)
            observation = {
                **common,
                "identifier": [{"system": IDENTIFIER_SYSTEM, "value": key}],
                "code": _codeable(finding_concept(finding.label), finding.label),
                "valueCodeableConcept": _codeable(PRESENT if finding.positive else ABSENT),
                "component": [
                    {"code": _codeable(PROBABILITY), "valueQuantity": _quantity(finding.probability, "1")},
                    {"code": _codeable(THRESHOLD), "valueQuantity": _quantity(finding.threshold, "1")},
                ],
            }
            entries.append(_entry(observation, obs_id, key))
            observation_refs.append({"reference": f"urn:uuid:{obs_id}"})
            if finding.positive:
                positives.append(finding.label)
        for measurement in result.measurements:
            meaning = measurement_concept(measurement.name)
            key = f"{sop_uid}/{identity}/measurement/{measurement.name}"
            obs_id = _uuid("observation", key)
            observation = {
                **common,
                "identifier": [{"system": IDENTIFIER_SYSTEM, "value": key}],
                "code": _codeable(meaning.quantity, measurement.name),
                "valueQuantity": _quantity(measurement.value, measurement.unit),
            }
            if meaning.site is not None:
                site = _codeable(meaning.site)
                if meaning.laterality is not None:
                    site["coding"].append(_coding(meaning.laterality))
                    site["text"] = f"{meaning.laterality.meaning} {meaning.site.meaning}".lower()
                observation["bodySite"] = site
            entries.append(_entry(observation, obs_id, key))
            observation_refs.append({"reference": f"urn:uuid:{obs_id}"})
    conclusion = f"Positive findings: {', '.join(positives)}." if positives else "No positive findings."
    notice = untrained_notice(results)
    if notice:
        conclusion = f"{notice}. {conclusion}"
    report_key = f"{sop_uid}/report/{_uuid('report-algorithms', *identities)}"
    report_id = _uuid("report", report_key)
    report = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": report_key}],
        "status": STATUS,
        **subject_part,
        "category": [{"coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"}]}],
        "code": _codeable(XRAY_REPORT),
        "imagingStudy": [study_ref],
        "result": observation_refs,
        "conclusion": conclusion,
    }
    entries.append(_entry(report, report_id, report_key))
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    shape = _shape(results, subject, bool(positives))
    plain = _plain_values(source, results)
    if not (plain and shape in _VALIDATED_SHAPES):
        validate_bundle(bundle)
        if plain and len(_VALIDATED_SHAPES) < MAX_VALIDATED_SHAPES:
            _VALIDATED_SHAPES.add(shape)
    return bundle


# The shapes (`_shape`) of the bundles fhir.resources validated in this process. A bundle is fully validated unless
# one of its shape was and it differs from that one only in values whose FHIR rules `_plain_values` checks: finite
# decimals and DICOM UIDs (digits and dots) in strings; its codes, texts, units, devices and structure are the
# validated bundle's.
MAX_VALIDATED_SHAPES = 1024
_VALIDATED_SHAPES: set[tuple[Any, ...]] = set()
_DICOM_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def _shape(results: Sequence[AlgorithmResult], subject: Mapping[str, Any] | None, positive: bool) -> tuple[Any, ...]:
    """All a bundle's content depends on besides the source's UIDs, the numbers and which findings are positive:
    the algorithms, their finding labels, measurement names and units, the subject, and whether any is positive
    (the conclusion's form; its list is made of labels the bundle also has as texts)."""
    return (
        json.dumps(subject, sort_keys=True) if subject is not None else None,
        positive,
        tuple(
            (r.algorithm, tuple(f.label for f in r.findings), tuple((m.name, m.unit) for m in r.measurements))
            for r in results
        ),
    )


def _plain_values(source: Dataset, results: Sequence[AlgorithmResult]) -> bool:
    """Every number finite (a FHIR decimal) and the source's Study, Series and SOP Instance UIDs DICOM UIDs."""
    uids = (source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID)
    if not all(isinstance(u, str) and len(u) <= 64 and _DICOM_UID.fullmatch(u) for u in uids):
        return False
    numbers = [x for r in results for f in r.findings for x in (f.probability, f.threshold)]
    numbers += [m.value for r in results for m in r.measurements]
    return all(math.isfinite(x) for x in numbers)


def validate_bundle(bundle: Mapping[str, Any]) -> None:
    """Validate the Bundle and each resource with fhir.resources (R4B) plus R4's status bindings; ValueError."""
    from fhir.resources.R4B.bundle import Bundle

    try:
        # the Bundle's model validates each entry's resource as its own type's model (get_fhir_model_class)
        Bundle.model_validate(dict(bundle))
    except Exception as exc:  # pydantic.ValidationError, and KeyError for an unknown resource type
        raise ValueError(f"invalid FHIR bundle: {exc}") from None
    for entry in bundle.get("entry", []):
        resource = entry["resource"]
        allowed = {"Observation": OBSERVATION_STATUSES, "DiagnosticReport": REPORT_STATUSES}.get(
            resource["resourceType"]
        )
        if allowed is not None and resource.get("status") not in allowed:
            raise ValueError(f"invalid FHIR bundle: {resource['resourceType']}.status {resource.get('status')!r}")


def bundle_json(bundle: Mapping[str, Any]) -> bytes:
    """Compact JSON: with ``indent`` Python encodes in pure Python instead of its C encoder."""
    return json.dumps(bundle, sort_keys=True, separators=(",", ":")).encode()


def report_identifier(bundle: Mapping[str, Any]) -> str:
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "DiagnosticReport":
            return str(entry["resource"]["identifier"][0]["value"])
    raise ValueError("the bundle has no DiagnosticReport")


def write_bundle(bundle: Mapping[str, Any], folder: str | os.PathLike[str]) -> Path:
    """Write the bundle as ``<report uuid>.json`` in ``folder`` atomically: a reader sees the whole file or none."""
    directory = Path(folder)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{_uuid('report', report_identifier(bundle))}.json"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(bundle_json(bundle))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
    return target


def post_bundle(
    bundle: Mapping[str, Any],
    base_url: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
    client: httpx.Client | None = None,
) -> dict[str, Any]:
    """POST the transaction bundle to the FHIR server's base URL; the transaction-response, or FhirPostError.
    ``client``: a long-lived client to send it with (its pool and TLS context reused), else a one-off request."""
    response = (client.post if client is not None else httpx.post)(
        base_url.rstrip("/") + "/",
        content=bundle_json(bundle),
        headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json", **(headers or {})},
        timeout=timeout_s,
    )
    if not response.is_success:
        raise FhirPostError(response.status_code, response.text)
    try:
        answer = response.json()
    except ValueError:
        raise FhirPostError(response.status_code, "the answer is not JSON: " + response.text) from None
    if not isinstance(answer, dict):
        raise FhirPostError(response.status_code, "the answer is not a FHIR resource")
    return answer
