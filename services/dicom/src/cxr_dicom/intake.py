"""What both intakes do with one received instance: check it, keep it on disk, queue it; all before the sender
hears "success", so an instance whose success status went out survives a kill -9 or a power loss."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cxr_dicom.acceptance import Accepted, Refusal, RefusalKind, check_part10, refusal_log_fields
from cxr_dicom.priority import PriorityPolicy
from cxr_dicom.work_queue import EnqueueResult, WorkQueue

log = logging.getLogger("cxr.dicom.intake")

INSTANCES_DIR = "instances"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class Received:
    """An instance the node accepted: its identifiers and what the queue said (``created`` False: a duplicate)."""

    accepted: Accepted
    enqueued: EnqueueResult


def instance_path(data_path: Path, sop_uid: str) -> Path:
    """Where the received file of ``sop_uid`` lives; the UID is checked so it cannot name another path."""
    if not _UID.match(sop_uid) or len(sop_uid) > 64:
        raise ValueError("not a DICOM UID")
    return data_path / INSTANCES_DIR / f"{sop_uid}.dcm"


def _write_durably(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Intake:
    """Check -> (anonymize) -> write the file, fsync'd -> enqueue. Thread-safe: the SCP calls it from its threads."""

    def __init__(self, data_path: Path, queue: WorkQueue, policy: PriorityPolicy, *, anonymize: bool) -> None:
        self.data_path = data_path
        self.queue = queue
        self.policy = policy
        self.anonymize = anonymize

    def receive(self, data: bytes, *, declared_sop_class: str | None = None, calling_ae: str | None = None) -> Received:
        """Accept one Part 10 instance or raise `Refusal` (not analysable) / `QueueFullError` (try later)."""
        try:
            accepted = check_part10(data, declared_sop_class)
        except Refusal as refused:
            log.warning("refused an instance", extra={"dicom": refusal_log_fields(refused), "calling_ae": calling_ae})
            raise
        try:
            path = instance_path(self.data_path, accepted.sop_instance_uid)
        except ValueError:
            bad_uid = Refusal(
                RefusalKind.DOES_NOT_MATCH_SOP_CLASS,
                "the SOP Instance UID is not a valid UID",
                sop_class_uid=accepted.sop_class_uid,
            )
            log.warning("refused an instance", extra={"dicom": refusal_log_fields(bad_uid), "calling_ae": calling_ae})
            raise bad_uid from None
        known = self.queue.get(accepted.sop_instance_uid)
        if known is not None:  # a re-send: nothing to write, the queue answers with its state
            again = self.queue.enqueue(
                accepted.sop_instance_uid, accepted.study_instance_uid, accepted.series_instance_uid, known.priority
            )
            return Received(accepted, again)
        ds = accepted.dataset
        priority = self.policy.decide(ds, calling_ae)
        if self.anonymize:
            from cxr_serving.dicom import anonymize_dataset

            anonymize_dataset(ds)  # UIDs stay: the results reference the same study, series and instance
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
        _write_durably(path, data)
        payload = json.dumps({"file": str(path.relative_to(self.data_path)), "calling_ae": calling_ae or ""})
        try:
            enqueued = self.queue.enqueue(
                accepted.sop_instance_uid,
                accepted.study_instance_uid,
                accepted.series_instance_uid,
                priority,
                payload,
            )
        except BaseException:
            if self.queue.get(accepted.sop_instance_uid) is None:
                path.unlink(missing_ok=True)
            raise
        log.info(
            "accepted an instance",
            extra={"priority": enqueued.priority.name.lower(), "new": enqueued.created, "calling_ae": calling_ae},
        )
        return Received(accepted, enqueued)
