"""The worker loop and the node's start: a queue call that raises costs one poll, never a worker; a dead worker
makes the node unready; a second node is refused before it touches the queue file; orphan files are swept.

The queue is the real SQLite `WorkQueue` (a subclass makes chosen calls raise once, as a locked database does);
the analysis and the sends are replaced by a `process` that records the call, since this is about the loop's
bookkeeping, not about what an attempt does."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import sqlite3
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import pytest

from cxr_client.client import AsyncCxrClient
from cxr_client.config import ClientConfig
from cxr_dicom.config import DicomConfig, dicom_config
from cxr_dicom.intake import instance_path
from cxr_dicom.service import DicomNode
from cxr_dicom.work_queue import DB_FILE, DEAD, DONE, QUEUED, Item, Priority, QueueLock, QueueLockedError, WorkQueue
from cxr_dicom.worker import Prepared, Worker
from cxr_serving import heap
from tests.support.servers import make_settings

STOW = {"stow_url": "http://127.0.0.1:9/dicom-web"}


class FlakyQueue(WorkQueue):
    """The real queue, whose calls named in ``raise_once`` raise "database is locked" the first time."""

    def __init__(self, *args: Any, raise_once: set[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raise_once = set(raise_once)
        self.raised: list[str] = []

    def _maybe_raise(self, name: str) -> None:
        if name in self.raise_once:
            self.raise_once.discard(name)
            self.raised.append(name)
            raise sqlite3.OperationalError("database is locked")

    def claim(self, worker: str) -> Item | None:
        self._maybe_raise("claim")
        return super().claim(worker)

    def complete(self, item: Item) -> bool:
        self._maybe_raise("complete")
        return super().complete(item)

    def fail(self, item: Item, reason: str, retry_after_s: float = 0.0) -> str | None:
        self._maybe_raise("fail")
        return super().fail(item, reason, retry_after_s)


class RecordingWorker(Worker):
    """`process` fails for the SOP UIDs in ``poison`` and otherwise succeeds at once."""

    def __init__(self, *args: Any, poison: set[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.poison = poison
        self.processed: list[str] = []

    async def analyse(self, item: Item) -> Prepared:
        self.processed.append(item.sop_uid)
        if item.sop_uid in self.poison:
            raise ValueError("an image the services refuse")
        return Prepared()

    async def finish(self, item: Item, prepared: Prepared) -> None:
        pass


def _cfg(tmp_path: Path, **extra: Any) -> DicomConfig:
    return DicomConfig.model_validate(
        {"data_path": str(tmp_path), "workers": 1, "retry_backoff_initial_s": 60, "destinations": STOW, **extra}
    )


async def _until(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_a_claim_complete_or_fail_that_raises_once_costs_no_worker_and_strands_no_item(tmp_path, caplog):
    queue = FlakyQueue(tmp_path, max_attempts=3, raise_once={"claim", "complete", "fail"})
    queue.enqueue("1.2.3.1", "1.2.3", "1.2.3.9", Priority.ROUTINE, '{"file": "instances/1.2.3.1.dcm"}')
    queue.enqueue("1.2.3.2", "1.2.3", "1.2.3.9", Priority.ROUTINE, '{"file": "instances/1.2.3.2.dcm"}')
    async with AsyncCxrClient(ClientConfig()) as client:
        worker = RecordingWorker(_cfg(tmp_path), queue, client, poison={"1.2.3.2"})
        worker.start()
        try:
            failure_logged = lambda: any(r.getMessage() == "an instance failed" for r in caplog.records)  # noqa: E731
            # the failure is logged after the queue records it: wait for both before stopping the worker
            await _until(lambda: queue.get("1.2.3.1").state == DONE and failure_logged())
            assert sorted(queue.raised) == ["claim", "complete", "fail"]
            assert worker.alive and not any(t.done() for t in worker._tasks)
        finally:
            await worker.stop()
    done, failed = queue.get("1.2.3.1"), queue.get("1.2.3.2")
    assert (done.state, done.attempts) == (DONE, 1) and worker.processed.count("1.2.3.1") == 1
    # the failed attempt is recorded (queued for a retry after the 60 s backoff), not left claimed to its lease
    assert (failed.state, failed.attempts) == (QUEUED, 1) and "ValueError" in (failed.last_error or "")
    queue.close()
    # the failure's log line names the instance by a hash of its UID, never by the UID (PHI-adjacent)
    [record] = [r for r in caplog.records if r.getMessage() == "an instance failed"]
    assert record.fields["instance"] == hashlib.sha256(b"1.2.3.2").hexdigest()[:12]
    assert "1.2.3.2" not in json.dumps(record.fields) and record.fields["transient"] is False
    # the raising queue calls were logged by their type only
    errors = [r.fields for r in caplog.records if r.levelname == "ERROR"]
    assert errors and all(f == {"error": "OperationalError"} for f in errors)


def _node_settings(tmp_path: Path, **extra: Any) -> Any:
    closed = "127.0.0.1:9"  # the discard port: no analysis service listens
    analysis = {"classification_endpoint": closed, "segmentation_endpoint": closed, "timeout_s": 5}
    dicom = {"data_path": "node", "dimse_port": 0, "stow_port": 0, "analysis": analysis, "destinations": STOW}
    return make_settings(data_path=str(tmp_path), models={"dicom": {**dicom, **extra}})


async def test_the_node_is_unready_once_a_worker_task_has_ended(tmp_path):
    settings = _node_settings(tmp_path, workers=2)
    node = DicomNode(settings, dicom_config(settings))
    await node.start()
    try:
        assert node.ready
        task = node.worker._tasks[0]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert not node.ready
    finally:
        await node.stop()


async def test_start_in_a_service_process_collects_the_heap_before_freezing_it(tmp_path, monkeypatch):
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    monkeypatch.setattr(heap, "_service_process", True)  # as run_service marks it
    garbage = Cycle()
    gone = weakref.ref(garbage)
    del garbage  # start-up garbage in a cycle: a collection frees it, a freeze would keep it for good
    settings = _node_settings(tmp_path)
    node = DicomNode(settings, dicom_config(settings))
    before = gc.get_freeze_count()
    await node.start()
    try:
        assert gone() is None
        assert gc.get_freeze_count() > before
        # pynetdicom's server runs a full collection every 60 turns of its loop: the node's start-up objects are
        # not among those it walks, and the FHIR models that validation loads on demand are loaded already
        walked = {id(o) for o in gc.get_objects()}
        started = [node.scp, node.worker, node.intake, node.queue]
        assert all(gc.is_tracked(o) for o in started)
        assert not any(id(o) in walked for o in started)
        assert {"fhir.resources.R4B.observation", "fhir.resources.R4B.auditevent"} <= set(sys.modules)
    finally:
        gc.unfreeze()  # give the test process its heap back
        await node.stop()


async def test_a_node_hosted_in_a_test_or_benchmark_process_leaves_that_process_heap_alone(tmp_path, monkeypatch):
    """A test or benchmark that runs the node in its own process keeps its objects collectable."""
    monkeypatch.setattr(heap, "_service_process", False)
    settings = _node_settings(tmp_path)
    node = DicomNode(settings, dicom_config(settings))
    before = gc.get_freeze_count()
    await node.start()
    try:
        assert gc.get_freeze_count() == before
    finally:
        await node.stop()


async def test_a_second_node_is_refused_before_it_opens_or_migrates_the_queue_file(tmp_path):
    settings = _node_settings(tmp_path)
    cfg = dicom_config(settings)
    with QueueLock(cfg.data_path):  # the first node
        node = DicomNode(settings, cfg)
        with pytest.raises(QueueLockedError):
            await node.start()
        assert not (cfg.data_path / DB_FILE).exists()


async def test_start_deletes_the_instance_files_no_unfinished_item_refers_to(tmp_path):
    settings = _node_settings(tmp_path)
    cfg = dicom_config(settings)
    files = {uid: instance_path(cfg.data_path, uid) for uid in ("1.9.1", "1.9.2", "1.9.3", "1.9.4", "1.9.5")}
    with WorkQueue(cfg.data_path, max_attempts=1) as queue:
        for uid in ("1.9.1", "1.9.2", "1.9.3", "1.9.4"):
            queue.enqueue(uid, "1.9", "1.9.0", Priority.ROUTINE, json.dumps({"file": f"instances/{uid}.dcm"}))
        assert queue.complete(queue.claim("w"))  # 1.9.1: done, its unlink never happened
        queue.fail(queue.claim("w"), "poison")  # 1.9.2: dead (kept for a retry)
        claimed = queue.claim("w")  # 1.9.3: claimed by a process that is gone
        assert claimed is not None and claimed.sop_uid == "1.9.3"
        # 1.9.4 queued; 1.9.5 written but never enqueued (a crash between the fsync and the enqueue)
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"DICM")
    tmp = cfg.data_path / "instances" / ".tmp-abc.dcm"
    tmp.write_bytes(b"half")
    node = DicomNode(settings, cfg)
    await node.start()
    try:
        # no analysis service listens, so nothing completes (and unlinks) while this looks
        kept = sorted(p.name for p in (cfg.data_path / "instances").iterdir())
        assert kept == ["1.9.2.dcm", "1.9.3.dcm", "1.9.4.dcm"]
        assert node.queue.get("1.9.2").state == DEAD
    finally:
        await node.stop()


def test_outages_are_transient_and_the_image_s_own_errors_are_not():
    import httpx

    from cxr_client.errors import DeadlineExceededError, InvalidImageError, OverloadedError, UnavailableError
    from cxr_dicom.fhir import FhirPostError
    from cxr_dicom.worker import CStoreBusy, StowRefused, _send_failure_is_transient, is_transient

    assert all(is_transient(e("x")) for e in (UnavailableError, DeadlineExceededError, OverloadedError))
    assert not is_transient(InvalidImageError("x")) and not is_transient(ValueError("x"))
    assert not is_transient(FileNotFoundError("the instance file"))  # outside a send: not an outage

    def http(status: int) -> StowRefused:
        return StowRefused(status, f"STOW-RS answered HTTP {status}")

    assert all(_send_failure_is_transient(http(s)) for s in (500, 503, 429))
    assert not any(_send_failure_is_transient(http(s)) for s in (400, 409))
    assert _send_failure_is_transient(FhirPostError(502, "")) and not _send_failure_is_transient(FhirPostError(422, ""))
    assert _send_failure_is_transient(ConnectionRefusedError()) and _send_failure_is_transient(httpx.ConnectError("x"))
    assert _send_failure_is_transient(CStoreBusy("no association"))
    assert _send_failure_is_transient(OSError(28, "No space left on device"))
    assert not _send_failure_is_transient(NotADirectoryError("the FHIR folder is a file"))
    assert not _send_failure_is_transient(FileExistsError("the FHIR folder is a file"))
    assert not _send_failure_is_transient(RuntimeError("C-STORE status 0xC000"))


@pytest.mark.parametrize(
    "argv", [["dicom", "retry"], ["dicom", "retry", "1.2.3", "--all"], ["dicom", "retry", "--study", "1.2"]]
)
def test_cli_dicom_retry_needs_one_uid_or_all(argv, capsys):
    from cxr_client.cli import main

    assert main(["--endpoint", "127.0.0.1:9", *argv]) == 2  # refused before any call
    assert "give a SOP Instance UID, or --all [--study UID]" in capsys.readouterr().err


async def test_stopping_the_node_aborts_a_live_association_before_the_queue_closes(tmp_path):
    """A sender keeps its association open after one stored instance; the node stops: the association is
    aborted (A-ABORT, not a 0xC2xx handler failure from a closed queue), the stored instance stays queued with
    its file, and no other file is left."""
    import pydicom
    from pydicom.uid import generate_uid
    from pynetdicom import AE

    from tests.support.paths import dicom_files

    settings = _node_settings(tmp_path, workers=1)
    node = DicomNode(settings, dicom_config(settings))
    await node.start()
    ds = pydicom.dcmread(dicom_files()[0])
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = await asyncio.to_thread(ae.associate, "127.0.0.1", node.dimse_port, ae_title=node.cfg.ae_title)
    try:
        assert assoc.is_established
        assert int((await asyncio.to_thread(assoc.send_c_store, ds)).Status) == 0x0000
        await node.stop()
        deadline = time.monotonic() + 10
        while not assoc.is_aborted and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        late = None
        if assoc.is_established:  # not aborted: what a sender then gets from a node whose queue is closed
            ds.SOPInstanceUID = generate_uid()
            late = (await asyncio.to_thread(assoc.send_c_store, ds)).get("Status")
        assert assoc.is_aborted, f"the association outlived the node; a C-STORE on it got status {late!r}"
    finally:
        if assoc.is_established:
            assoc.abort()
    with WorkQueue(node.cfg.data_path) as queue:
        assert sorted(queue.unfinished_sop_uids()) == [str(pydicom.dcmread(dicom_files()[0]).SOPInstanceUID)]
    files = sorted(p.name for p in (node.cfg.data_path / "instances").iterdir())
    assert files == [f"{pydicom.dcmread(dicom_files()[0]).SOPInstanceUID}.dcm"]


async def test_an_item_queued_while_the_claim_loops_idle_wakes_them_before_their_next_poll(tmp_path, monkeypatch):
    """The queue tells the worker when an item is queued, so an idle node claims it at once, not at its next poll
    (made 30 s here, so only the wake-up can claim in time)."""
    monkeypatch.setattr("cxr_dicom.worker.IDLE_POLL_S", 30.0)
    queue = WorkQueue(tmp_path)
    async with AsyncCxrClient(ClientConfig()) as client:
        worker = RecordingWorker(_cfg(tmp_path, workers=2), queue, client, poison=set())
        worker.start()
        try:
            await asyncio.sleep(0.3)  # every claim loop found nothing and is idle
            for n in range(3):  # from another thread, as the C-STORE SCP enqueues
                sop = f"1.2.3.{n}"
                await asyncio.to_thread(queue.enqueue, sop, "1.2.3", "1.2.3.9", Priority.ROUTINE, "")
                await _until(lambda sop=sop: queue.get(sop).state == DONE, timeout=5.0)
            queue.enqueue("1.2.3.9", "1.2.3", "1.2.3.9", Priority.ROUTINE, "")  # and from the event loop's thread
            await _until(lambda: queue.get("1.2.3.9").state == DONE, timeout=5.0)
            assert worker.processed == ["1.2.3.0", "1.2.3.1", "1.2.3.2", "1.2.3.9"]
        finally:
            stopping = time.monotonic()
            await worker.stop()
            assert time.monotonic() - stopping < 5.0  # the idle loops do not hold the stop for their poll
    queue.close()
