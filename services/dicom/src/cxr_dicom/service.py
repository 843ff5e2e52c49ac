"""The DICOM node on the shared runtime: `build_binding(settings)` starts the C-STORE SCP, the STOW-RS route and
the workers with the gRPC API, and stops them in the reverse order."""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from pathlib import Path
from typing import Any

from cxr_client.client import AsyncCxrClient
from cxr_dicom import metrics
from cxr_dicom.config import DicomConfig, dicom_config
from cxr_dicom.intake import INSTANCES_DIR, Intake
from cxr_dicom.intakes import StowServer, start_scp
from cxr_dicom.servicer import DicomServicer
from cxr_dicom.work_queue import QueueLock, WorkQueue
from cxr_dicom.worker import Worker, client_config
from cxr_protos.dicom.v1 import dicom_service_pb2 as pb
from cxr_protos.dicom.v1 import dicom_service_pb2_grpc as pb_grpc
from cxr_serving import heap
from cxr_serving.auth import ApiKeyStore
from cxr_serving.server import ServiceBinding
from cxr_serving.settings import Settings

log = logging.getLogger("cxr.dicom.node")

SERVICE = pb.DESCRIPTOR.services_by_name["DicomService"].full_name


class DicomNode:
    """The node's moving parts; `dimse_port` and `stow_port` are the bound ports once started."""

    def __init__(self, settings: Settings, cfg: DicomConfig) -> None:
        self.cfg = cfg
        self.host = settings.endpoint("dicom").host
        self.security = settings.security
        self.lock = QueueLock(cfg.data_path)
        # Opened in start(), under the lock: a second node is refused before it touches (or migrates) the file.
        self.queue: WorkQueue | None = None
        self.intake: Intake | None = None
        self.stow: StowServer | None = None
        self.client: AsyncCxrClient | None = None
        self.worker: Worker | None = None
        self.scp: Any = None
        self.dimse_port = 0
        self.started = False

    @property
    def ready(self) -> bool:
        """Started, and every worker task still running (one that ended would leave the queue unserved)."""
        return self.started and self.worker is not None and self.worker.alive

    @property
    def stow_port(self) -> int:
        return 0 if self.stow is None else self.stow.port

    async def start(self) -> None:
        """Lock the queue (QueueLockedError: another node runs on it), open it, take back the leases a previous
        process left, delete the instance files no queue row refers to, then start the workers and the intakes."""
        self.lock.acquire()
        cfg, sec = self.cfg, self.security
        self.queue = await asyncio.to_thread(
            WorkQueue, cfg.data_path, max_pending=cfg.max_queue_size, max_attempts=cfg.max_attempts, lease_s=cfg.lease_s
        )
        requeued, dead = await asyncio.to_thread(self.queue.reclaim_abandoned)
        if requeued or dead:
            log.warning(
                "took back the instances a previous node process left claimed",
                extra={"fields": {"requeued": requeued, "dead_lettered": dead}},
            )
        orphans = await asyncio.to_thread(sweep_orphans, cfg.data_path, self.queue)
        if orphans:
            log.warning("deleted received files no queue item refers to", extra={"fields": {"files": orphans}})
        self.intake = Intake(
            cfg.data_path, self.queue, cfg.priority_policy(), anonymize=sec.anonymize_dicom, ae_title=cfg.ae_title
        )
        keys = ApiKeyStore(sec.api_keys, sec.api_key_file) if sec.enable_authentication else None
        self.stow = StowServer(cfg, self.intake, keys, self.host, trusted_proxies=sec.trusted_proxies)
        metrics.QUEUES.attach(self.queue)
        self.client = AsyncCxrClient(client_config(self.cfg))
        self.worker = Worker(self.cfg, self.queue, self.client)
        self.worker.start()
        await self.stow.start()
        self.scp = await asyncio.to_thread(start_scp, self.cfg, self.intake, self.host)
        self.dimse_port = int(self.scp.server_address[1])
        freeze_startup_heap()
        self.started = True

    async def stop(self) -> None:
        self.started = False
        if self.scp is not None:
            await asyncio.to_thread(stop_scp, self.scp)
        if self.stow is not None:
            await self.stow.stop()
        if self.worker is not None:
            await self.worker.stop()
        if self.client is not None:
            await self.client.close()
        if self.queue is not None:
            metrics.QUEUES.detach(self.queue)
            self.queue.close()
        self.lock.release()


def freeze_startup_heap() -> bool:
    """Take what start-up made (modules, the FHIR models validation loads on demand, the SCP's contexts) out of the
    garbage collector's view: pynetdicom's server runs a full ``gc.collect()`` every 60 turns of its loop, and a full
    collection walks every tracked object in the process. In a service process only (`cxr_serving.heap`)."""
    for module in ("auditevent", "bundle", "device", "diagnosticreport", "observation"):
        importlib.import_module(f"fhir.resources.R4B.{module}")
    return heap.freeze_startup_heap()


SCP_DRAIN_S = 30.0


def stop_scp(scp: Any, drain_s: float = SCP_DRAIN_S) -> None:
    """Stop accepting associations, abort the live ones and wait (up to ``drain_s``) for their threads, so the
    queue is closed only after: a sender mid-association gets an A-ABORT, never a handler failure (0xC2xx) from a
    closed queue, and a C-STORE being handled ends with its instance queued or not written."""
    associations = list(scp.active_associations)
    scp.shutdown()  # pynetdicom leaves the running associations alone
    associations += [a for a in scp.active_associations if a not in associations]
    for assoc in associations:
        assoc.abort()
    deadline = time.monotonic() + drain_s
    for assoc in associations:
        assoc.join(max(0.0, deadline - time.monotonic()))
    alive = sum(assoc.is_alive() for assoc in associations)
    if alive:
        log.error("associations still running after the SCP stopped", extra={"fields": {"associations": alive}})


def sweep_orphans(data_path: Path, queue: WorkQueue) -> int:
    """Delete the received files (PHI) of no queued, claimed or dead item: what a crash between the fsync and
    the enqueue, or between the completion and the unlink, left; the count. Run under the queue's lock."""
    folder = data_path / INSTANCES_DIR
    if not folder.is_dir():
        return 0
    keep = queue.unfinished_sop_uids()
    removed = 0
    for path in folder.glob("*.dcm"):
        if path.name.startswith(".tmp-") or path.stem not in keep:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def build_binding(settings: Settings, cfg: DicomConfig | None = None) -> ServiceBinding:
    cfg = cfg or dicom_config(settings)
    node = DicomNode(settings, cfg)
    servicer = DicomServicer(lambda: node.queue)
    return ServiceBinding(
        name="dicom",
        full_service_names=[SERVICE],
        register=lambda server: pb_grpc.add_DicomServiceServicer_to_server(servicer, server),
        on_start=node.start,
        on_stop=node.stop,
        readiness=lambda: node.ready,
        extra={"node": node},
    )
