"""What both intakes do with one received instance: check it, keep it on disk, queue it; all before the sender
hears "success", so an instance whose success status went out survives a kill -9 or a power loss."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_dicom import audit_events
from cxr_dicom.acceptance import Accepted, Refusal, RefusalKind, check_part10, read_header, refusal_log_fields
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
    """Check -> write the original file, fsync'd -> enqueue (with ``anonymize``: the analysis gets an anonymized
    copy). Thread-safe: the SCP calls it from its threads."""

    def __init__(
        self, data_path: Path, queue: WorkQueue, policy: PriorityPolicy, *, anonymize: bool, ae_title: str = "CXR_DICOM"
    ) -> None:
        self.data_path = data_path
        self.queue = queue
        self.policy = policy
        self.anonymize = anonymize
        self.ae_title = ae_title

    def receive(
        self,
        data: bytes,
        *,
        declared_sop_class: str | None = None,
        calling_ae: str | None = None,
        via: str = "dimse",
        api_key_id: str | None = None,
        peer: str = "",
    ) -> Received:
        """Accept one Part 10 instance or raise `Refusal` (not analysable) / `QueueFullError` (try later).

        ``via`` (dimse, stow), ``api_key_id`` (a key's fingerprint) and ``peer`` go to the audit trail."""
        audit = {"intake": via, "node_ae": self.ae_title, "calling_ae": calling_ae, "api_key_id": api_key_id}
        try:
            received = self._receive(data, declared_sop_class, calling_ae)
        except Refusal as refusal:
            self.audit_refusal(refusal, data, peer=peer, **audit)
            raise
        audit_events.received(received.accepted.study_instance_uid, peer=peer, **audit)
        return received

    def audit_refusal(self, refusal: Refusal, data: bytes = b"", **audit: Any) -> None:
        """The import AuditEvent of a refused instance: outcome 4, the status the sender got and why; the study
        is the one its header names, if it can be read."""
        status = refusal.dimse_status if audit.get("intake") == "dimse" else refusal.stow_failure_reason
        study = str(read_header(data).get("StudyInstanceUID", "") or "").strip() if data else ""
        audit_events.received(study, refused=f"0x{status:04X} {refusal.kind.name}", **audit)

    def _receive(self, data: bytes, declared_sop_class: str | None, calling_ae: str | None) -> Received:
        try:
            accepted = check_part10(data, declared_sop_class)
        except Refusal as refused:
            log.warning(
                "refused an instance",
                extra={"fields": {"dicom": refusal_log_fields(refused), "calling_ae": calling_ae}},
            )
            raise
        try:
            path = instance_path(self.data_path, accepted.sop_instance_uid)
        except ValueError:
            bad_uid = Refusal(
                RefusalKind.DOES_NOT_MATCH_SOP_CLASS,
                "the SOP Instance UID is not a valid UID",
                sop_class_uid=accepted.sop_class_uid,
            )
            log.warning(
                "refused an instance",
                extra={"fields": {"dicom": refusal_log_fields(bad_uid), "calling_ae": calling_ae}},
            )
            raise bad_uid from None
        known = self.queue.get(accepted.sop_instance_uid)
        if known is not None:  # a re-send: nothing to write, the queue answers with its state
            again = self.queue.enqueue(
                accepted.sop_instance_uid, accepted.study_instance_uid, accepted.series_instance_uid, known.priority
            )
            return Received(accepted, again)
        ds = accepted.dataset
        priority = self.policy.decide(ds, calling_ae)
        # The original is kept: the results go back under the source's patient and study; with ``anonymize``
        # the worker sends only an anonymized copy to the analysis services.
        _write_durably(path, data)
        payload = json.dumps(
            {
                "file": str(path.relative_to(self.data_path)),
                "calling_ae": calling_ae or "",
                "anonymize_for_analysis": self.anonymize,
            }
        )
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
            extra={
                "fields": {
                    "priority": enqueued.priority.name.lower(),
                    "new_instance": enqueued.created,
                    "calling_ae": calling_ae,
                }
            },
        )
        return Received(accepted, enqueued)
