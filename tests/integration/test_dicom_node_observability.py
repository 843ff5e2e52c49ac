"""The DICOM node's operations signals on the real stack of test_dicom_node (real classification and segmentation
services, the node, a real Orthanc): the Prometheus numbers on the node's metrics port move by exactly what was
sent, a failing destination counts as failed and dead-letters, every transfer leaves a valid BALP AuditEvent on
``cxr.audit``, and no ordinary log line carries the patient's data."""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cxr_dicom import audit_events
from cxr_dicom.service import build_binding as dicom_binding
from cxr_protos.dicom.v1 import dicom_service_pb2 as pb
from cxr_protos.dicom.v1 import dicom_service_pb2_grpc as pb_grpc
from cxr_serving.audit import key_fingerprint
from cxr_serving.logging_setup import JsonFormatter
from tests.support.dicom_node import (
    NODE_AE,
    LoopThread,
    Stack,
    c_store,
    copy_with_new_uids,
    encode,
    node_settings,
    start_server,
    stow,
)
from tests.support.paths import dicom_files
from tests.support.servers import TEST_KEY, auth

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        if family.name.startswith("cxr_dicom_")
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


class Records(logging.Handler):
    """Every record of every logger, from every thread (pynetdicom's, the workers' and the event loop's)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def audit_events(self) -> list[dict[str, Any]]:
        fmt = JsonFormatter("dicom")
        lines = [fmt.format(r) for r in self.records if r.name == "cxr.audit"]
        assert all("\n" not in line for line in lines)  # one JSON line each
        return [e["auditEvent"] for e in map(json.loads, lines) if e.get("event", "").startswith("dicom.")]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _events(events: list[dict[str, Any]], study: str, action: str) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e["action"] == action
        and e["entity"][0].get("what", {}).get("identifier", {}).get("value") == f"urn:oid:{study}"
    ]


def test_metrics_move_by_what_was_sent_and_each_transfer_is_audited(stack: Stack, tmp_path: Path, records: Records):
    port = stack.server.metrics.port
    files = dicom_files()
    n = len(files)
    before = scrape(port)
    started = time.monotonic()
    studies: dict[str, str] = {}
    for path in files:
        _, ds = copy_with_new_uids(path, tmp_path / "dimse")
        assert c_store(stack.node.dimse_port, ds) == 0x0000
        studies[ds.StudyInstanceUID] = "dimse"
    copies = [copy_with_new_uids(p, tmp_path / "stow") for p in files]
    parts = [("application/dicom", p.read_bytes()) for p, _ in copies] + [("application/dicom", b"not dicom")]
    answer = stow(stack.node.stow_port, parts)
    assert answer.status_code == 202, answer.text  # n stored, one refused
    studies.update({ds.StudyInstanceUID: "stow" for _, ds in copies})
    from pydicom.data import get_testdata_file

    assert c_store(stack.node.dimse_port, pydicom.dcmread(get_testdata_file("CT_small.dcm"))) == 0xA900
    answers = stack.wait_finished(list(studies))
    elapsed = time.monotonic() - started
    assert all(a.done == 1 for a in answers.values())
    after = scrape(port)

    assert delta(before, after, "cxr_dicom_instances_accepted_total", intake="dimse") == n
    assert delta(before, after, "cxr_dicom_instances_accepted_total", intake="stow") == n
    assert delta(before, after, "cxr_dicom_instances_refused_total", intake="dimse", status="0xA900") == 1
    assert delta(before, after, "cxr_dicom_instances_refused_total", intake="stow", status="0xC000") == 1
    for destination, objects in (("stow", ("sr", "seg")), ("cstore", ("sr", "seg")), ("fhir_folder", ("fhir_bundle",))):
        for kind in objects:
            sent = delta(before, after, "cxr_dicom_results_sent_total", destination=destination, object=kind)
            assert sent == 2 * n, (destination, kind)
            assert delta(before, after, "cxr_dicom_results_failed_total", destination=destination, object=kind) == 0
    assert delta(before, after, "cxr_dicom_time_to_result_seconds_count", priority="routine") == 2 * n
    assert delta(before, after, "cxr_dicom_time_to_result_seconds_count", priority="stat") == 0
    spent = delta(before, after, "cxr_dicom_time_to_result_seconds_sum", priority="routine")
    assert 0 < spent <= 2 * n * elapsed
    infinite = delta(before, after, "cxr_dicom_time_to_result_seconds_bucket", priority="routine", le="+Inf")
    assert infinite == 2 * n
    for priority in ("stat", "routine"):  # everything finished: nothing waits, nothing was dead-lettered
        for state in ("queued", "in_progress"):
            assert value(after, "cxr_dicom_queue_depth", priority=priority, state=state) == 0, (priority, state)
        assert delta(before, after, "cxr_dicom_queue_depth", priority=priority, state="dead") == 0
        assert value(after, "cxr_dicom_queue_oldest_age_seconds", priority=priority) == 0

    events = records.audit_events()
    key_id = key_fingerprint(TEST_KEY)
    for study, intake in studies.items():
        (imported,) = _events(events, study, "C")
        audit_events.validate(imported)
        assert imported["type"]["code"] == "110104" and imported["outcome"] == "0"
        assert imported["subtype"][0]["code"] == intake
        source, destination = imported["agent"]
        assert source["type"]["coding"][0]["code"] == "110153" and source["requestor"] is True
        expected = "MODALITY" if intake == "dimse" else key_id
        assert source["who"]["identifier"]["value"] == expected
        assert destination["who"]["identifier"]["value"] == NODE_AE
        exported = _events(events, study, "R")
        for event in exported:
            audit_events.validate(event)
        by_destination = {e["subtype"][0]["code"]: e for e in exported}
        assert len(exported) == 3 and set(by_destination) == {"stow", "cstore", "fhir_folder"}, exported
        assert all(e["outcome"] == "0" for e in exported)
        assert by_destination["cstore"]["agent"][1]["who"]["identifier"]["value"] == stack.orthanc.ae_title
        assert by_destination["fhir_folder"]["type"]["code"] == "110106"
        assert by_destination["stow"]["entity"][0]["detail"] == [{"type": "objects", "valueString": "sr,seg"}]
    refused = sorted((e["subtype"][0]["code"], e["outcome"], e["outcomeDesc"]) for e in events if e["outcome"] != "0")
    assert refused == [("dimse", "4", "0xA900 SOP_CLASS_NOT_SUPPORTED"), ("stow", "4", "0xC000 CANNOT_UNDERSTAND")]
    assert not any(TEST_KEY in json.dumps(e) for e in events)  # the key's fingerprint only, never the key


def test_a_failing_destination_counts_failed_audits_the_failure_and_dead_letters(
    stack: Stack, tmp_path: Path, records: Records
):
    """A second node on the same analysis services whose STOW-RS destination does not listen: each of its tries
    (the first builds the results, the later ones resend them) fails to deliver the SR and the SEG and is audited.
    A closed port is an outage (transient: no attempt spent), given up after max_transient_retry_s (1 s)."""
    settings = node_settings(
        tmp_path, None, *stack.analysis_ports, max_attempts=2, max_transient_retry_s=1.0, workers=1
    )
    loop = LoopThread()
    try:
        server = loop.run(start_server(settings, dicom_binding(settings)))
        node = server.binding.extra["node"]
        try:
            before = scrape(server.metrics.port)
            _, ds = copy_with_new_uids(dicom_files()[0], tmp_path / "in")
            assert c_store(node.dimse_port, ds) == 0x0000
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = pb_grpc.DicomServiceStub(ch)
                deadline = time.monotonic() + 120
                while True:
                    status = stub.GetStudyStatus(
                        pb.GetStudyStatusRequest(study_instance_uid=ds.StudyInstanceUID), metadata=auth(), timeout=10
                    )
                    if status.dead or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
            assert status.dead == 1 and status.instances[0].attempts == 1, status
            assert "transient failures for" in status.instances[0].last_error
            after = scrape(server.metrics.port)
        finally:
            loop.run(server.stop(grace=1), timeout=60)
    finally:
        loop.close()
    tries = delta(before, after, "cxr_dicom_results_failed_total", destination="stow", object="sr")
    assert tries >= 2
    for kind in ("sr", "seg"):
        assert delta(before, after, "cxr_dicom_results_failed_total", destination="stow", object=kind) == tries
        assert delta(before, after, "cxr_dicom_results_sent_total", destination="stow", object=kind) == 0
    # the FHIR folder comes after STOW-RS: nothing reached it
    assert delta(before, after, "cxr_dicom_results_sent_total", destination="fhir_folder", object="fhir_bundle") == 0
    assert delta(before, after, "cxr_dicom_time_to_result_seconds_count", priority="routine") == 0
    assert delta(before, after, "cxr_dicom_queue_depth", priority="routine", state="dead") == 1
    exported = _events(records.audit_events(), ds.StudyInstanceUID, "R")
    assert len(exported) == tries and all(e["outcome"] == "8" and e["outcomeDesc"] for e in exported), exported
    assert {e["agent"][1]["who"]["identifier"]["value"] for e in exported} == {"http://127.0.0.1:9/dicom-web"}


PHI = {
    "PatientName": "Quaxworth^Zelphine^Orla",
    "PatientID": "PID-58213377",
    "PatientBirthDate": "19230725",
    "AccessionNumber": "ACC99887766",
}


def test_no_patient_data_in_any_ordinary_log_during_intake_analysis_and_delivery(
    stack: Stack, tmp_path: Path, records: Records
):
    """Copies of every shared radiograph carry synthetic patient data; they go in by C-STORE and STOW-RS and are
    analysed and delivered to Orthanc and the FHIR folder. No record of any logger but ``cxr.audit``, at any level,
    formatted as the service formats it (message, extra fields, exception), carries one of those values."""
    studies = []
    blobs = []
    for route in ("dimse", "stow"):
        for path in dicom_files():
            target, ds = copy_with_new_uids(path, tmp_path / route)
            for keyword, text in PHI.items():
                setattr(ds, keyword, text)
            ds.save_as(target, enforce_file_format=True)
            studies.append(ds.StudyInstanceUID)
            if route == "dimse":
                assert c_store(stack.node.dimse_port, ds) == 0x0000
            else:
                blobs.append(encode(ds))
    assert stow(stack.node.stow_port, [("application/dicom", b) for b in blobs]).status_code == 200
    answers = stack.wait_finished(studies)
    assert all(a.done == 1 for a in answers.values())
    stored = [
        pydicom.dcmread(p)
        for p in (tmp_path / "dimse").glob("*.dcm")  # the copies sent really carried the values
    ]
    assert all(str(ds.PatientID) == PHI["PatientID"] for ds in stored)

    fmt = JsonFormatter("dicom")
    ordinary = [r for r in records.records if not r.name.startswith("cxr.audit")]
    names = {r.name for r in ordinary}
    # the capture saw the node's own path and the DICOM library under it
    assert {"cxr.dicom.intake", "cxr.dicom.worker"} <= names and any(n.startswith("pynetdicom") for n in names)
    assert sum(1 for r in ordinary if r.getMessage() == "results sent") >= len(studies)
    needles = [*PHI.values(), "Quaxworth", "Zelphine", "58213377", "99887766"]
    for record in ordinary:
        line = fmt.format(record) + " " + json.dumps(record.__dict__, default=str)
        leaked = [v for v in needles if v in line]
        assert not leaked, (record.name, leaked, line[:500])
