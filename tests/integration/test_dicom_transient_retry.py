"""A destination that is down does not dead-letter the backlog: the worker retries with backoff and spends no
attempt until a real Orthanc comes up on the configured ports, which then gets the results; an image the
services refuse still dead-letters after ``max_attempts``.

The queue, the SR/bundle building, the C-STORE sender and Orthanc are real; the analysis is a canned result
(the classification and segmentation services are not what this is about). The destination is C-STORE only."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from cxr_client.client import AsyncCxrClient
from cxr_client.config import ClientConfig
from cxr_client.errors import InvalidImageError
from cxr_dicom.config import DicomConfig
from cxr_dicom.intake import instance_path
from cxr_dicom.results import Algorithm, AlgorithmResult, Finding
from cxr_dicom.work_queue import DEAD, DONE, QUEUED, Item, Priority, WorkQueue
from cxr_dicom.worker import Prepared, Worker
from tests.support.orthanc import free_port, require, run_orthanc
from tests.support.paths import dicom_files

CANNED = [
    AlgorithmResult(
        Algorithm(name="binary_classifier", version="1", checkpoint_hash="1", untrained=True),
        findings=[Finding(label="abnormal", probability=0.7, threshold=0.5, positive=True)],
    )
]
BACKOFF_SUM_S = 0.3  # the backoff before dead-lettering with max_attempts 2: 0.1 + 0.2 s


class CannedAnalysisWorker(Worker):
    """The real worker with a canned analysis: the SR and bundle are built and sent for real."""

    poison: frozenset[str] = frozenset()

    async def analyse(self, item: Item) -> Prepared:
        if item.sop_uid in self.poison:
            raise InvalidImageError("the services refuse this image", reason="IMAGE_DECODE_FAILED")
        data = (self.cfg.data_path / json.loads(item.payload)["file"]).read_bytes()
        return Prepared(data=data, results=CANNED)


def _enqueue(queue: WorkQueue, data_path: Path, source: Path) -> str:
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = instance_path(data_path, ds.SOPInstanceUID)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    payload = json.dumps({"file": f"instances/{path.name}"})
    queue.enqueue(ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, Priority.ROUTINE, payload)
    return str(ds.SOPInstanceUID)


async def _until(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def test_an_outage_longer_than_every_backoff_dead_letters_nothing_and_the_item_is_delivered_after(tmp_path):
    require()
    http_port, dicom_port = free_port(), free_port()
    data_path = tmp_path / "node"
    cfg = DicomConfig.model_validate(
        {
            "data_path": str(data_path),
            "workers": 2,
            "max_attempts": 2,
            "retry_backoff_initial_s": 0.1,
            "retry_backoff_max_s": 0.2,
            "destinations": {
                "cstore": {"host": "127.0.0.1", "port": dicom_port, "ae_title": "ORTHANC"},
                "timeout_s": 10,
            },
        }
    )
    with WorkQueue(data_path, max_attempts=cfg.max_attempts, lease_s=cfg.lease_s) as queue:
        good = _enqueue(queue, data_path, dicom_files()[0])
        poison = _enqueue(queue, data_path, dicom_files()[0])
        async with AsyncCxrClient(ClientConfig()) as client:
            worker = CannedAnalysisWorker(cfg, queue, client)
            worker.poison = frozenset({poison})
            worker.start()
            try:
                down_since = time.monotonic()
                await _until(lambda: queue.get(poison).state == DEAD, 30)
                assert queue.get(poison).attempts == cfg.max_attempts
                assert "InvalidImageError" in (queue.get(poison).last_error or "")
                # five failed sends in a row: more than max_attempts, and longer than its whole backoff
                await _until(lambda: queue.get(good).transient_retries >= 5, 90)
                during = queue.get(good)
                assert time.monotonic() - down_since > BACKOFF_SUM_S
                assert during.state in (QUEUED, "claimed") and during.attempts <= 1, during
                assert "DestinationUnavailable" in (during.last_error or "")
                with run_orthanc(tmp_path / "orthanc", ports=(http_port, dicom_port)) as orthanc:
                    await _until(lambda: queue.get(good).state in (DONE, DEAD), 60)
                    done = queue.get(good)
                    assert (done.state, done.attempts) == (DONE, 1), done
                    stored = [orthanc.get(f"/instances/{i}/simplified-tags") for i in orthanc.get("/instances")]
                    # the SR of the good image, nothing of the poison one
                    assert [t["Modality"] for t in stored] == ["SR"], stored
                    assert stored[0]["StudyInstanceUID"] == done.study_uid
            finally:
                await worker.stop()
