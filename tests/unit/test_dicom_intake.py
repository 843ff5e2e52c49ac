"""cxr_dicom.intake: what both intakes do before answering "stored", on real files and a real SQLite queue."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pydicom
import pytest

from cxr_dicom.acceptance import Refusal
from cxr_dicom.intake import Intake, instance_path
from cxr_dicom.priority import PriorityPolicy
from cxr_dicom.work_queue import QUEUED, Priority, QueueFullError, WorkQueue
from tests.support.paths import dicom_files


def make_intake(tmp_path, *, anonymize=False, max_pending=10):
    queue = WorkQueue(tmp_path, max_pending=max_pending)
    policy = PriorityPolicy.from_config([{"calling_ae_titles": ["ER_DX"], "priority": "stat"}])
    return Intake(tmp_path, queue, policy, anonymize=anonymize), queue


def test_accepted_instance_is_on_disk_and_queued_with_its_priority(tmp_path):
    intake, queue = make_intake(tmp_path)
    data = dicom_files()[0].read_bytes()
    received = intake.receive(data, calling_ae="ER_DX")
    sop = received.accepted.sop_instance_uid
    assert received.enqueued.created and received.enqueued.priority == Priority.STAT
    item = queue.get(sop)
    assert item is not None and item.state == QUEUED
    stored = tmp_path / json.loads(item.payload)["file"]
    assert stored == instance_path(tmp_path, sop) and stored.read_bytes() == data
    assert not list(stored.parent.glob(".tmp-*"))  # written through a temporary file, renamed
    # a re-send: known, not queued again, the file untouched
    again = intake.receive(data, calling_ae="MODALITY")
    assert not again.enqueued.created and again.enqueued.priority == Priority.STAT
    assert queue.study_status(received.accepted.study_instance_uid)[QUEUED] == 1


def test_anonymize_dicom_keeps_the_original_and_the_analysis_copy_strips_patient_data_but_keeps_the_uids(tmp_path):
    """The node's durable store holds the original (its results go back under the real patient); only the copy
    the worker sends to the analysis services is anonymized."""
    from cxr_dicom.worker import analysis_copy

    intake, queue = make_intake(tmp_path, anonymize=True)
    data = dicom_files()[0].read_bytes()
    original = pydicom.dcmread(io.BytesIO(data))
    received = intake.receive(data)
    path = instance_path(tmp_path, received.accepted.sop_instance_uid)
    assert path.read_bytes() == data
    item = queue.get(received.accepted.sop_instance_uid)
    assert item is not None and json.loads(item.payload)["anonymize_for_analysis"] is True
    copy = pydicom.dcmread(io.BytesIO(analysis_copy(path.read_bytes())))
    assert str(copy.PatientName) == "ANONYMIZED" and copy.PatientID == "ANONYMIZED"
    assert str(original.PatientName) != "ANONYMIZED"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert copy.get(keyword) == original.get(keyword)
    assert copy.pixel_array.shape == original.pixel_array.shape
    plain, plain_queue = make_intake(tmp_path / "plain")
    other = plain.receive(dicom_files()[1].read_bytes())
    other_item = plain_queue.get(other.accepted.sop_instance_uid)
    assert other_item is not None and json.loads(other_item.payload)["anonymize_for_analysis"] is False


def test_refused_and_backpressured_instances_leave_nothing_behind(tmp_path):
    intake, _ = make_intake(tmp_path, max_pending=1)
    files = dicom_files()
    with pytest.raises(Refusal) as refusal:
        intake.receive(b"not a dicom file")
    assert refusal.value.dimse_status == 0xC000
    first = intake.receive(files[0].read_bytes())
    with pytest.raises(QueueFullError):
        intake.receive(files[1].read_bytes())
    kept = sorted(p.name for p in (tmp_path / "instances").iterdir())
    assert kept == [f"{first.accepted.sop_instance_uid}.dcm"]


def test_instance_path_accepts_only_uids():
    for bad in ("../../etc/passwd", "1.2/3", "", "1..2", "1" * 65):
        with pytest.raises(ValueError):
            instance_path(Path("/data"), bad)


async def test_the_worker_forgets_finished_instances_after_done_retention_s(tmp_path):
    from cxr_client.client import AsyncCxrClient
    from cxr_client.config import ClientConfig
    from cxr_dicom.config import DicomConfig
    from cxr_dicom.worker import Worker

    cfg = DicomConfig.model_validate(
        {"data_path": str(tmp_path), "done_retention_s": 0, "destinations": {"stow_url": "http://127.0.0.1:9/"}}
    )
    intake, queue = make_intake(tmp_path)
    received = intake.receive(dicom_files()[0].read_bytes())
    sop = received.accepted.sop_instance_uid
    item = queue.claim("test")
    assert item is not None and queue.complete(item)
    await asyncio.sleep(0.01)  # finished strictly before the purge looks
    async with AsyncCxrClient(ClientConfig()) as client:
        worker = Worker(cfg, queue, client)
        worker.start()
        try:
            for _ in range(100):
                if queue.get(sop) is None:
                    break
                await asyncio.sleep(0.05)
        finally:
            await worker.stop()
    assert queue.get(sop) is None  # a re-send now would be analysed again


def test_intake_log_lines_carry_their_fields_in_the_json_log(tmp_path, caplog):
    """The JSON formatter writes only `extra={"fields": ...}`: other extra keys never reach the log."""
    from cxr_serving.logging_setup import JsonFormatter

    intake, _ = make_intake(tmp_path)
    with caplog.at_level("INFO", logger="cxr.dicom.intake"):
        intake.receive(dicom_files()[0].read_bytes(), calling_ae="ER_DX")
        with pytest.raises(Refusal):
            intake.receive(b"not dicom", calling_ae="ER_DX")
    lines = {r.getMessage(): json.loads(JsonFormatter("dicom").format(r)) for r in caplog.records}
    accepted, refused = lines["accepted an instance"], lines["refused an instance"]
    assert accepted["calling_ae"] == "ER_DX" and accepted["priority"] == "stat" and accepted["new_instance"] is True
    assert refused["calling_ae"] == "ER_DX" and "dicom" in refused
