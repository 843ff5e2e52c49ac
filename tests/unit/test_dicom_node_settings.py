"""Node settings that only show in what leaves the node: `destinations.stow_headers` and `destinations.fhir_headers`
reach real HTTP servers on 127.0.0.1 (each only its own), and `default_priority: stat` makes an instance no rule
matches STAT in the real queue."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from cxr_client.client import AsyncCxrClient
from cxr_dicom.config import dicom_config
from cxr_dicom.intake import Intake
from cxr_dicom.results import Algorithm, AlgorithmResult, Finding
from cxr_dicom.work_queue import Priority, WorkQueue
from cxr_dicom.worker import ResultObject, Worker, build_results, client_config
from tests.support.http_recorder import Recorder, multipart_datasets, recording_server
from tests.support.paths import dicom_files
from tests.support.servers import make_settings

RESULTS = [AlgorithmResult(Algorithm("binary_classifier", "1", "ab" * 32), findings=(Finding("Mass", 0.7, 0.5, True),))]


def node_cfg(tmp_path: Path, **dicom: Any) -> Any:
    return dicom_config(make_settings(data_path=str(tmp_path), models={"dicom": dicom}))


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    with recording_server() as r:
        yield r


def test_stow_and_fhir_headers_reach_their_destination_and_only_theirs(tmp_path, recorder):
    cfg = node_cfg(
        tmp_path,
        destinations={
            "stow_url": recorder.url + "/dicom-web",
            "stow_headers": {"X-Test": "stow-7"},
            "fhir_url": recorder.url + "/fhir",
            "fhir_headers": {"Authorization": "Bearer fhir-secret"},
            "timeout_s": 10,
        },
    )
    worker = Worker(cfg, WorkQueue(tmp_path / "q"), AsyncCxrClient(api_key="unused"))
    source = dicom_files()[0].read_bytes()
    datasets, bundle = build_results(source, RESULTS, b"")
    worker.senders.send([ResultObject.of(ds) for ds in datasets], bundle)

    by_path = {path: (headers, body) for path, headers, body in recorder.requests}
    assert sorted(by_path) == ["/dicom-web/studies", "/fhir/"] and len(recorder.requests) == 2
    stow_headers, stow_body = by_path["/dicom-web/studies"]
    assert stow_headers["X-Test"] == "stow-7" and "Authorization" not in stow_headers
    [sr] = multipart_datasets(stow_headers["Content-Type"], stow_body)
    assert sr.Modality == "SR" and sr.SOPInstanceUID == datasets[0].SOPInstanceUID
    fhir_headers, fhir_body = by_path["/fhir/"]
    assert fhir_headers["Authorization"] == "Bearer fhir-secret" and "X-Test" not in fhir_headers
    assert json.loads(fhir_body) == bundle


def _new_instance(path: Path) -> bytes:
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_default_priority_stat_makes_an_unmatched_instance_stat_and_claimed_first(tmp_path):
    cfg = node_cfg(
        tmp_path,
        default_priority="stat",
        priority_rules=[{"calling_ae_titles": ["WARD"], "priority": "routine"}],
        destinations={"stow_url": "http://127.0.0.1:9/dicom-web"},
    )
    with WorkQueue(cfg.data_path) as queue:
        intake = Intake(cfg.data_path, queue, cfg.priority_policy(), anonymize=False)
        routine = intake.receive(_new_instance(dicom_files()[0]), calling_ae="WARD")
        unmatched = intake.receive(_new_instance(dicom_files()[0]), calling_ae="MODALITY")
        assert routine.enqueued.priority == Priority.ROUTINE
        assert unmatched.enqueued.priority == Priority.STAT
        first = queue.claim("w")
        assert first is not None and first.sop_uid == unmatched.accepted.sop_instance_uid


def test_rotating_key_follows_the_file_and_keeps_the_last_key_while_it_is_gone(tmp_path):
    key_file = tmp_path / "api-key"
    key_file.write_text("\nold-key\n")
    cfg = node_cfg(
        tmp_path, analysis={"api_key_file": str(key_file)}, destinations={"stow_url": "http://127.0.0.1:9/dicom-web"}
    )
    client = AsyncCxrClient(client_config(cfg))
    worker = Worker(cfg, WorkQueue(tmp_path / "q"), client)
    assert client.config.api_key == "old-key"
    worker.key.refresh(client)
    assert client.config.api_key == "old-key"
    key_file.write_text("new-key\n")
    os.utime(key_file, ns=(1, 1))  # a different mtime, whatever the clock's resolution
    worker.key.refresh(client)
    assert client.metadata() == (("x-api-key", "new-key"),)
    key_file.unlink()  # a secret volume between two generations
    worker.key.refresh(client)
    assert client.config.api_key == "new-key"


def _store_response(items: list[tuple[pydicom.Dataset, int]]) -> bytes:
    """A PS3.18 Store Instances response failing each (instance, FailureReason)."""
    answer = pydicom.Dataset()
    failed = []
    for ds, reason in items:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        item.FailureReason = reason
        failed.append(item)
    answer.FailedSOPSequence = failed
    return json.dumps(answer.to_json_dict()).encode()


def test_a_stow_rs_archive_that_already_has_the_results_counts_them_as_delivered(tmp_path, recorder):
    """409 with every FailureReason 0x0111 (Duplicate SOP Instance; as 202 beside stored ones): delivered. Any
    other FailureReason in a 409 or 202: refused, not retried as an outage (a 4xx)."""
    from cxr_dicom.worker import StowRefused, _send_failure_is_transient

    cfg = node_cfg(tmp_path, destinations={"stow_url": recorder.url + "/dicom-web", "timeout_s": 10})
    worker = Worker(cfg, WorkQueue(tmp_path / "q"), AsyncCxrClient(api_key="unused"))
    datasets, bundle = build_results(dicom_files()[0].read_bytes(), RESULTS, b"")
    objects = [ResultObject.of(ds) for ds in datasets]
    for status in (409, 202):
        recorder.stow_answer = (status, _store_response([(ds, 0x0111) for ds in datasets]))
        worker.senders.send(objects, bundle)  # no exception: delivered
    recorder.stow_answer = (409, _store_response([(datasets[0], 0xC000)]))
    with pytest.raises(StowRefused, match="0xC000") as refused:
        worker.senders.send(objects, bundle)
    assert not _send_failure_is_transient(refused.value)
    recorder.stow_answer = (202, _store_response([(datasets[0], 0xA900)]))
    with pytest.raises(StowRefused, match="0xA900"):
        worker.senders.send(objects, bundle)
    # every request carried the kept bytes of the SR as its one part
    assert len(recorder.stow_bodies()) == 4
    assert all(recorder.stow_parts(i) == [objects[0].data] for i in range(4))


def test_a_c_store_archive_that_answers_duplicate_sop_instance_counts_the_result_as_delivered(tmp_path):
    """A pynetdicom Storage SCP (a stand-in for an archive that refuses re-sent instances) answers 0x0111 to
    every C-STORE: the send succeeds; 0xC000 from it fails the send."""
    from pynetdicom import AE, StoragePresentationContexts, evt

    from cxr_dicom.worker import ResultObject as Kept

    status = {"code": 0x0111}
    scp = AE(ae_title="ARCHIVE")
    scp.supported_contexts = StoragePresentationContexts
    server = scp.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: status["code"])]
    )
    try:
        port = int(server.server_address[1])
        cfg = node_cfg(tmp_path, destinations={"cstore": {"host": "127.0.0.1", "port": port, "ae_title": "ARCHIVE"}})
        worker = Worker(cfg, WorkQueue(tmp_path / "q"), AsyncCxrClient(api_key="unused"))
        datasets, bundle = build_results(dicom_files()[0].read_bytes(), RESULTS, b"")
        worker.senders.send([Kept.of(ds) for ds in datasets], bundle)
        status["code"] = 0xC000
        with pytest.raises(RuntimeError, match="0xC000"):
            worker.senders.send([Kept.of(ds) for ds in datasets], bundle)
    finally:
        server.shutdown()
