"""The node's AuditEvents: valid FHIR (fhir.resources R4B) in the BALP shape, one JSON line each on ``cxr.audit``,
the study by its UID, the sender by AE title or key fingerprint, never a key or a URL credential."""

from __future__ import annotations

import json
import logging

import pytest

from cxr_dicom import audit_events
from cxr_serving.audit import key_fingerprint
from cxr_serving.logging_setup import JsonFormatter

STUDY = "1.2.826.0.1.3680043.8.498.1"


def test_import_by_dimse_names_the_calling_ae_and_the_study():
    event = audit_events.import_event(STUDY, intake="dimse", node_ae="CXRNODE", calling_ae="MODALITY", peer="127.0.0.1")
    assert event["resourceType"] == "AuditEvent"
    assert event["type"] == {
        "system": "http://dicom.nema.org/resources/ontology/DCM",
        "code": "110104",
        "display": "DICOM Instances Transferred",
    }
    assert (event["action"], event["outcome"], event["subtype"][0]["code"]) == ("C", "0", "dimse")
    source, destination = event["agent"]
    assert source["type"]["coding"][0]["code"] == "110153" and source["requestor"] is True
    assert source["who"]["identifier"]["value"] == "MODALITY"
    assert source["network"] == {"address": "127.0.0.1", "type": "2"}
    assert destination["type"]["coding"][0]["code"] == "110152"
    assert destination["who"]["identifier"]["value"] == "CXRNODE"
    assert event["source"]["type"][0]["code"] == "4"
    (study,) = event["entity"]
    assert study["what"]["identifier"]["value"] == f"urn:oid:{STUDY}"
    assert study["what"]["identifier"]["type"]["coding"][0]["code"] == "110180"
    assert (study["type"]["code"], study["role"]["code"]) == ("2", "3")


def test_import_by_stow_names_the_key_fingerprint_never_the_key():
    key = "s3cret-api-key-value"
    event = audit_events.import_event(STUDY, intake="stow", node_ae="CXRNODE", api_key_id=key_fingerprint(key))
    assert event["agent"][0]["who"]["identifier"]["value"] == key_fingerprint(key)
    assert key not in json.dumps(event)


def test_exports_strip_url_credentials_and_record_failures():
    stow = audit_events.export_event(
        STUDY,
        destination="stow",
        target="https://user:pw@pacs.example:8443/dicom-web?token=abc",
        node_ae="CXRNODE",
        objects=["sr", "seg"],
        error="ConnectError",
    )
    text = json.dumps(stow)
    assert "pw" not in text and "token" not in text
    assert stow["agent"][1]["who"]["identifier"]["value"] == "https://pacs.example:8443/dicom-web"
    assert (stow["type"]["code"], stow["action"], stow["outcome"], stow["outcomeDesc"]) == (
        "110104",
        "R",
        "8",
        "ConnectError",
    )
    cstore = audit_events.export_event(
        STUDY, destination="cstore", target="ORTHANC@10.0.0.7:4242", node_ae="CXRNODE", objects=["sr"]
    )
    assert cstore["agent"][1]["who"]["identifier"]["value"] == "ORTHANC"
    assert cstore["agent"][1]["network"] == {"address": "10.0.0.7", "type": "2"}
    fhir = audit_events.export_event(
        STUDY, destination="fhir", target="http://ehr:8080/fhir", node_ae="CXRNODE", objects=["fhir_bundle"]
    )
    assert fhir["type"]["code"] == "110106" and fhir["outcome"] == "0"


def test_validation_refuses_an_event_fhir_does_not_accept():
    event = audit_events.import_event(STUDY, intake="dimse", node_ae="CXRNODE", calling_ae="MODALITY")
    broken = {**event, "agent": [{"who": {"display": "x"}}]}  # agent.requestor is required
    with pytest.raises(ValueError, match="invalid AuditEvent"):
        audit_events.validate(broken)


def test_exporting_writes_one_json_line_on_cxr_audit_for_success_and_failure(caplog):
    caplog.set_level(logging.INFO, logger="cxr.audit")
    with audit_events.exporting(STUDY, destination="cstore", target="PACS@h:104", node_ae="N", objects=["sr"]):
        pass
    with (
        pytest.raises(ConnectionError),
        audit_events.exporting(STUDY, destination="cstore", target="PACS@h:104", node_ae="N", objects=["sr"]),
    ):
        raise ConnectionError("refused")
    lines = [JsonFormatter("dicom").format(r) for r in caplog.records if r.name == "cxr.audit"]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    entries = [json.loads(line) for line in lines]
    assert [e["event"] for e in entries] == ["dicom.export", "dicom.export"]
    assert [e["auditEvent"]["outcome"] for e in entries] == ["0", "8"]
    for entry in entries:
        assert entry["audit"] is True and entry["logger"] == "cxr.audit"
        audit_events.validate(entry["auditEvent"])
