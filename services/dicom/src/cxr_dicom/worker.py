"""The worker: claim an accepted instance, analyse it through the platform's public gRPC APIs, build the SR,
the SEG and the FHIR bundle, send them, and complete or fail the queue item (retries back off; the queue
dead-letters after ``max_attempts``)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from pydicom import Dataset, dcmread
from pydicom.uid import UID

from cxr_client.client import AsyncCxrClient
from cxr_client.client import Priority as AnalysisPriority
from cxr_client.config import ClientConfig
from cxr_client.errors import CxrClientError
from cxr_dicom import audit_events, metrics
from cxr_dicom.codes import measurement_concept
from cxr_dicom.config import DestinationsConfig, DicomConfig
from cxr_dicom.fhir import FhirPostError, build_bundle, post_bundle, write_bundle
from cxr_dicom.intake import instance_path
from cxr_dicom.results import Algorithm, AlgorithmResult, Finding, Measurement
from cxr_dicom.sr import add_contributing_equipment, algorithm_identity, build_sr, encode_sr
from cxr_dicom.work_queue import DONE, Item, Priority, WorkQueue
from cxr_protos.classification.v1 import classification_service_pb2 as cls_pb
from cxr_protos.common.v1 import common_pb2
from cxr_protos.segmentation.v1 import segmentation_service_pb2 as seg_pb
from cxr_serving.dicom import DERIVED_TYPE2_KEYWORDS

log = logging.getLogger("cxr.dicom.worker")

IDLE_POLL_S = 0.2
PURGE_EVERY_S = 600.0
RESULTS_DIR = "results"
BUNDLE_FILE = "bundle.json"
TMP_PREFIX = ".tmp-"
TMP_STALE_S = 3600.0  # a temporary folder older than this belongs to no running save
# The study's priority (the node's priority rules) rides on its analysis calls, so the services' batchers
# serve a STAT study's images before routine ones too.
ANALYSIS_PRIORITY: dict[Priority, AnalysisPriority] = {Priority.STAT: "stat", Priority.ROUTINE: "routine"}
TRANSIENT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


# A folder destination that is a file, missing or not writable: a configuration fault, not an outage.
LOCAL_FAULTS = (FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class DestinationUnavailable(Exception):
    """A send failed because its destination is down or busy (not because of what was sent): retried without
    spending an attempt."""


def _send_failure_is_transient(exc: BaseException) -> bool:
    """Connection errors and timeouts, other I/O errors (a full disk), HTTP 5xx/429 (STOW-RS, FHIR), C-STORE
    "out of resources"; not 4xx nor a misconfigured FHIR folder."""
    status: int | None = None
    if isinstance(exc, (FhirPostError, StowRefused)):
        status = exc.status
    if status is not None:
        return status >= 500 or status == 429
    if isinstance(exc, LOCAL_FAULTS):
        return False
    return isinstance(exc, (OSError, httpx.TransportError, CStoreBusy))


def is_transient(exc: BaseException) -> bool:
    """A failure that says nothing about the image: the analysis services unavailable, overloaded or too slow
    (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED), or a destination down (`DestinationUnavailable`)."""
    if isinstance(exc, DestinationUnavailable):
        return True
    if isinstance(exc, CxrClientError):
        return exc.code in TRANSIENT_CODES
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return exc.code() in TRANSIENT_CODES
    return False


DUPLICATE_SOP_INSTANCE = 0x0111  # PS3.7 Annex C, "Duplicate SOP Instance": C-STORE status, STOW-RS FailureReason


class StowRefused(Exception):
    """A STOW-RS request the archive refused or failed, with its HTTP status (5xx and 429 are retried)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _failed_sop_items(response: httpx.Response) -> list[Dataset] | None:
    """The FailedSOPSequence items of a Store Instances response (DICOM JSON), [] when it has none, None when the
    body is not such a response."""
    try:
        answer = Dataset.from_json(response.json()) if response.content else Dataset()
    except Exception:
        return None
    return list(answer.get("FailedSOPSequence") or [])


class CStoreBusy(ConnectionError):
    """The PACS did not answer a C-STORE or refused it for lack of resources (0xA7xx): try later."""


def client_config(cfg: DicomConfig) -> ClientConfig:
    """The `cxr_client` config of the node: the environment's, with `models.dicom.analysis` on top."""
    a = cfg.analysis
    endpoints = {
        name: ep
        for name, ep in (("classification", a.classification_endpoint), ("segmentation", a.segmentation_endpoint))
        if ep
    }
    base = ClientConfig.from_env()
    key = a.api_key
    if key is None and a.api_key_file is not None:
        key = read_key_file(a.api_key_file)
    return base.model_copy(
        update={
            "endpoints": {**base.endpoints, **endpoints},
            "api_key": key or base.api_key,
            "timeout_s": a.timeout_s,
        }
    )


def read_key_file(path: Path) -> str | None:
    """The first non-empty line of a mounted key file (the key the node sends)."""
    return next((ln.strip() for ln in path.read_text().splitlines() if ln.strip()), None)


class RotatingKey:
    """``analysis.api_key_file`` re-read when its mtime changes, so a rotated key is sent without a restart."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._mtime: int | None = None if path is None else _mtime_ns(path)

    def refresh(self, client: AsyncCxrClient) -> None:
        """Put the file's current key in ``client``'s config if the file changed since the last look."""
        if self.path is None:
            return
        mtime = _mtime_ns(self.path)
        if mtime is None or mtime == self._mtime:
            return  # unchanged, or gone (a secret being replaced): keep the last key
        key = read_key_file(self.path)
        self._mtime = mtime
        if key and key != client.config.api_key:
            client.config = client.config.model_copy(update={"api_key": key})
            log.info("analysis api key re-read from its file", extra={"fields": {"file": str(self.path)}})


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _algorithm(model: common_pb2.ModelInfo, untrained: bool) -> Algorithm:
    return Algorithm(
        name=model.name or "unknown",
        version=model.version or "unknown",
        checkpoint_hash=model.version or "untrained",
        untrained=untrained or model.untrained,
        model_card=model.model_card,
    )


def classification_results(reply: cls_pb.ClassifyImageResponse) -> list[AlgorithmResult]:
    """One result per classifier; a finding without a threshold (no operating point) has no decision to report."""
    out = []
    for prediction in reply.predictions:
        findings = [
            Finding(label=f.label, probability=float(f.probability), threshold=float(f.threshold), positive=f.positive)
            for f in prediction.findings
            if math.isfinite(f.threshold) and math.isfinite(f.probability)
        ]
        out.append(AlgorithmResult(_algorithm(prediction.model, False), findings=findings))
    return out


def _known(name: str) -> bool:
    try:
        measurement_concept(name)
    except ValueError:
        return False
    return True


def segmentation_result(reply: seg_pb.SegmentImageResponse) -> AlgorithmResult:
    """The CTR and the anatomy areas and widths (mm when the image has a pixel spacing, pixels otherwise)."""
    m = reply.measurements
    values: list[Measurement] = []
    if not m.cardiothoracic_ratio_unavailable_reason and m.cardiothoracic_ratio > 0:
        values.append(Measurement("cardiothoracic_ratio", float(m.cardiothoracic_ratio), "1"))
    widths = (("heart", m.heart_width_mm, m.heart_width_px), ("thorax", m.thorax_width_mm, m.thorax_width_px))
    for part, mm, px in widths:
        if mm > 0:
            values.append(Measurement(f"{part}_width", float(mm), "mm"))
        elif px > 0:
            values.append(Measurement(f"{part}_width", float(px), "px"))
    for mask in reply.masks:
        name = f"{mask.label}_area"
        if not _known(name):
            continue
        if mask.area_mm2 > 0:
            values.append(Measurement(name, float(mask.area_mm2), "mm2"))
        elif mask.area_pixels > 0:
            values.append(Measurement(name, float(mask.area_pixels), "px2"))
    return AlgorithmResult(_algorithm(reply.model, reply.untrained), measurements=values)


def instance_key(sop_uid: str) -> str:
    """A log key for an instance that is not PHI: the first 12 hex digits of its SOP Instance UID's sha256."""
    return hashlib.sha256(sop_uid.encode()).hexdigest()[:12]


def result_uid(*parts: str) -> str:
    """A UID fixed by its parts: a retry sends the same SR, which a PACS then stores once."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'urn:cxr:dicom:' + '/'.join(parts)).int}"


class Senders:
    """The configured result destinations; STOW-RS and FHIR go through one HTTP client, kept for the node's life,
    because a new client builds a TLS context (loads the CA bundle) on every request."""

    def __init__(self, dest: DestinationsConfig, calling_ae: str) -> None:
        self.dest = dest
        self.calling_ae = calling_ae
        self._http: httpx.Client | None = None
        self._http_lock = threading.Lock()

    @property
    def http(self) -> httpx.Client:
        """The shared client (thread-safe; made on first use): its pool keeps connections to the destinations."""
        with self._http_lock:
            if self._http is None:
                self._http = httpx.Client(timeout=self.dest.timeout_s)
            return self._http

    def close(self) -> None:
        with self._http_lock:
            if self._http is not None:
                self._http.close()
                self._http = None

    def stow(self, objects: Sequence[ResultObject]) -> None:
        """STOW-RS of the kept bytes (PS3.18 Store Instances); an instance the archive already has (FailureReason
        0x0111, Duplicate SOP Instance) counts as stored: the same UIDs carry the same result."""
        assert self.dest.stow_url is not None
        boundary = f"cxr-{uuid.uuid4().hex}"
        body = b"".join(
            b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + o.data + b"\r\n"
            for o in objects
        )
        body += b"--" + boundary.encode() + b"--\r\n"
        headers = {
            **self.dest.stow_headers,
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        url = self.dest.stow_url.rstrip("/") + "/studies"
        response = self.http.post(url, content=body, headers=headers)
        failed = _failed_sop_items(response)
        if failed is None:  # no Store Instances response in the body
            if response.is_success:
                return
            raise StowRefused(response.status_code, f"STOW-RS answered HTTP {response.status_code}")
        refused = [f for f in failed if f.get("FailureReason") != DUPLICATE_SOP_INSTANCE]
        if len(refused) < len(failed):
            log.info("the archive already had result instance(s)", extra={"fields": {"duplicates": len(failed)}})
        if not refused and (response.is_success or (response.status_code == 409 and failed)):
            return
        reasons = sorted({f"0x{int(f.get('FailureReason', 0)):04X}" for f in refused})
        raise StowRefused(
            response.status_code, f"STOW-RS answered HTTP {response.status_code}, {len(refused)} refused {reasons}"
        )

    def cstore(self, objects: Sequence[ResultObject]) -> None:
        from pynetdicom import AE

        peer = self.dest.cstore
        assert peer is not None
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.dest.timeout_s
        datasets = [o.dataset for o in objects]
        for ds in datasets:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
        if not assoc.is_established:
            raise ConnectionError(f"C-STORE: no association with {peer.ae_title}@{peer.host}:{peer.port}")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                if "Status" not in status:
                    raise CStoreBusy(f"C-STORE of a {ds.Modality} result: no answer from {peer.ae_title}")
                code = int(status.Status)
                if 0xA700 <= code <= 0xA7FF:
                    raise CStoreBusy(f"C-STORE of a {ds.Modality} result: out of resources, 0x{code:04X}")
                if code == DUPLICATE_SOP_INSTANCE:  # the archive has this result already: delivered
                    log.info("the archive already had a result instance", extra={"fields": {"status": "0x0111"}})
                elif code not in (0x0000, 0xB000, 0xB007, 0xB006):
                    raise RuntimeError(f"C-STORE of a {ds.Modality} result: status 0x{code & 0xFFFF:04X}")
        finally:
            assoc.release()

    def fhir(self, bundle: dict[str, Any], study_uid: str = "") -> None:
        if self.dest.fhir_folder is not None:
            with self._tracked(study_uid, "fhir_folder", self.dest.fhir_folder.absolute().as_uri(), ["fhir_bundle"]):
                write_bundle(bundle, self.dest.fhir_folder)
        if self.dest.fhir_url is not None:
            with self._tracked(study_uid, "fhir", self.dest.fhir_url, ["fhir_bundle"]):
                post_bundle(
                    bundle,
                    self.dest.fhir_url,
                    headers=dict(self.dest.fhir_headers),
                    timeout_s=self.dest.timeout_s,
                    client=self.http,
                )

    @contextlib.contextmanager
    def _tracked(self, study_uid: str, destination: str, target: str, objects: Sequence[str]) -> Iterator[None]:
        """Count the objects sent or failed (metrics) and write the export AuditEvent of one destination."""
        with (
            metrics.delivery(destination, objects),
            audit_events.exporting(
                study_uid, destination=destination, target=target, node_ae=self.calling_ae, objects=objects
            ),
        ):
            yield

    def send(self, objects: Sequence[ResultObject], bundle: dict[str, Any]) -> None:
        study_uid = str(objects[0].dataset.StudyInstanceUID) if objects else ""
        kinds = [metrics.object_kind(o.dataset) for o in objects]
        if self.dest.stow_url is not None:
            with self._tracked(study_uid, "stow", self.dest.stow_url, kinds):
                self.stow(objects)
        if self.dest.cstore is not None:
            peer = self.dest.cstore
            with self._tracked(study_uid, "cstore", f"{peer.ae_title}@{peer.host}:{peer.port}", kinds):
                self.cstore(objects)
        self.fhir(bundle, study_uid)


@dataclass
class Prepared:
    """What an item's analysis leaves for its results stage: the results a previous attempt kept (``saved``), or
    the original instance and the services' answers to build them from."""

    data: bytes = b""
    results: list[AlgorithmResult] = field(default_factory=list)
    seg: bytes = b""
    saved: tuple[list[ResultObject], dict[str, Any]] | None = None


class Worker:
    """Claim loops on the event loop, ``cfg.workers`` of them analysing at once and as many building and sending
    the results of the items analysed before, in the order their analyses ended; decoding, building and sending
    run in threads."""

    def __init__(self, cfg: DicomConfig, queue: WorkQueue, client: AsyncCxrClient) -> None:
        self.cfg = cfg
        self.queue = queue
        self.client = client
        self.senders = Senders(cfg.destinations, cfg.ae_title)
        a = cfg.analysis
        self.key = RotatingKey(a.api_key_file if a.api_key is None else None)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._analysing = asyncio.Semaphore(cfg.workers)
        self._finishing = asyncio.Semaphore(cfg.workers)
        self._arrived = asyncio.Event()
        self._unlisten: Any = None

    def _wake(self) -> None:
        """Wake every idle claim loop (on the event loop): work was queued, or the worker is stopping."""
        arrived, self._arrived = self._arrived, asyncio.Event()
        arrived.set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._unlisten = self.queue.on_queued(lambda: loop.call_soon_threadsafe(self._wake))
        loops = 2 * self.cfg.workers  # as many again build and send while ``workers`` analyse
        self._tasks = [asyncio.create_task(self._loop(i), name=f"dicom-worker-{i}") for i in range(loops)]
        self._tasks.append(asyncio.create_task(self._purge_loop(), name="dicom-purge"))

    async def _purge_loop(self) -> None:
        """Forget finished rows older than ``done_retention_s`` (the idempotency window), so the queue stays small."""
        while not self._stopping.is_set():
            removed = await asyncio.to_thread(self.queue.purge_finished, self.cfg.done_retention_s)
            if removed:
                log.info("forgot finished instances", extra={"fields": {"removed": removed}})
            swept = await asyncio.to_thread(sweep_results, self.cfg.data_path, self.queue)
            if swept:
                log.info("removed results of finished instances", extra={"fields": {"removed": swept}})
            try:
                await asyncio.wait_for(self._stopping.wait(), PURGE_EVERY_S)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        self._stopping.set()
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        self._wake()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.senders.close()

    @property
    def alive(self) -> bool:
        """False once any worker task has ended while the node is not stopping: the node then is not ready."""
        return bool(self._tasks) and (self._stopping.is_set() or not any(t.done() for t in self._tasks))

    async def _idle(self, arrived: asyncio.Event | None = None) -> None:
        """Wait one poll, or less: until ``arrived`` (work queued since it was taken) or the worker stops."""
        try:
            await asyncio.wait_for((arrived or self._stopping).wait(), IDLE_POLL_S)
        except TimeoutError:
            pass

    async def _loop(self, index: int) -> None:
        """Every step is guarded: a queue call that raises (a locked or full disk) costs one idle poll, never the
        worker (the log names the error's type only: a message could carry an identifier)."""
        while not self._stopping.is_set():
            arrived = self._arrived  # taken before the claim: an item queued while it finds none still wakes it
            try:
                worked = await self._step(f"{self.name}/{index}")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("a worker step failed", extra={"fields": {"error": type(exc).__name__}})
                worked = False
            if not worked:
                await self._idle(arrived)

    async def _settle(self, call: Any, *args: Any) -> Any:
        """A queue bookkeeping call retried until it succeeds or the node stops, so a claim whose outcome is known
        is not left to its lease; the last error is raised when stopping."""
        while True:
            try:
                return await asyncio.to_thread(call, *args)
            except Exception as exc:
                if self._stopping.is_set():
                    raise
                log.error("queue bookkeeping failed, retrying", extra={"fields": {"error": type(exc).__name__}})
                await self._idle()

    async def _step(self, worker: str) -> bool:
        """Claim and handle one item; False when none was ready. The item is claimed only once an analysis slot is
        free (a STAT item that arrives meanwhile is the next one claimed), and the slot is freed as soon as the
        services have answered, so the next item's analysis runs while this one's results are built and sent."""
        async with self._analysing:
            item = await asyncio.to_thread(self.queue.claim, worker)
            if item is None:
                return False
            try:
                prepared = await self._unless_cancelled(item, self.analyse(item))
            except Exception as exc:
                await self._failed(item, exc)
                return True
        try:
            async with self._finishing:  # first analysed, first finished: a STAT item claimed first ends first
                await self._unless_cancelled(item, self.finish(item, prepared))
        except Exception as exc:
            await self._failed(item, exc)
            return True
        if await self._settle(self.queue.complete, item):
            await asyncio.to_thread(metrics.result_delivered, self.queue, item.sop_uid, item.priority)
            path = instance_path(self.cfg.data_path, item.sop_uid)
            path.unlink(missing_ok=True)
            await asyncio.to_thread(discard_results, self.cfg.data_path, item.sop_uid)
            log.info(
                "results sent",
                extra={"fields": {"attempts": item.attempts, "priority": item.priority.name.lower()}},
            )
        return True

    async def _unless_cancelled(self, item: Item, work: Any) -> Any:
        """``await work``; on shutdown (cancelled) the item goes back to the queue unspent."""
        try:
            return await work
        except asyncio.CancelledError:
            await asyncio.to_thread(self.queue.release, item)
            raise

    async def _failed(self, item: Item, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        transient = is_transient(exc)
        if transient:  # a service or destination down: retried with backoff, no attempt spent
            delay = self.cfg.backoff_s(item.transient_retries + 1)
            state = await self._settle(
                self.queue.requeue_transient, item, reason, delay, self.cfg.max_transient_retry_s
            )
        else:  # the image's own failure: retried with backoff, dead-lettered after max_attempts
            state = await self._settle(self.queue.fail, item, reason, self.cfg.backoff_s(item.attempts))
        fields = {"attempt": item.attempts, "state": state, "transient": transient, "reason": reason}
        log.warning("an instance failed", extra={"fields": {**fields, "instance": instance_key(item.sop_uid)}})

    async def analyse(self, item: Item) -> Prepared:
        """The services' answers for ``item`` (none when a previous attempt kept its built results)."""
        await asyncio.to_thread(self.key.refresh, self.client)
        payload = json.loads(item.payload)
        saved = await asyncio.to_thread(load_results, self.cfg.data_path, item.sop_uid)
        if saved is not None:  # a retry resends these exact bytes under the same UIDs
            return Prepared(saved=saved)
        data = await asyncio.to_thread((self.cfg.data_path / payload["file"]).read_bytes)
        analysed = await asyncio.to_thread(analysis_copy, data) if payload.get("anonymize_for_analysis") else data
        image = common_pb2.Image(data=analysed, content_type="application/dicom")
        priority = ANALYSIS_PRIORITY[item.priority]
        cls_reply, seg_reply = await asyncio.gather(
            self.client.classify(image, model_names=self.cfg.analysis.classification_models, priority=priority),
            self.client.segment(image, mask_encoding="none", include_dicom_seg=True, priority=priority),
        )
        results = [*classification_results(cls_reply), segmentation_result(seg_reply)]
        return Prepared(data=data, results=results, seg=seg_reply.dicom_seg)

    async def finish(self, item: Item, prepared: Prepared) -> None:
        """Build the results (the first attempt: kept durably before anything is sent) and deliver them."""
        saved = prepared.saved
        if saved is None:
            built, built_bundle = await asyncio.to_thread(self.build, prepared.data, prepared.results, prepared.seg)
            saved = await asyncio.to_thread(save_results, self.cfg.data_path, item.sop_uid, built, built_bundle)
        objects, bundle = saved
        await self.deliver(objects, bundle)

    async def deliver(self, objects: Sequence[ResultObject], bundle: dict[str, Any]) -> None:
        """Send to every destination; a destination down or busy raises `DestinationUnavailable`."""
        try:
            await asyncio.to_thread(self.senders.send, objects, bundle)
        except Exception as exc:
            if _send_failure_is_transient(exc):
                raise DestinationUnavailable(f"{type(exc).__name__}: {exc}") from exc
            raise

    def build(self, data: bytes, results: list[AlgorithmResult], seg: bytes) -> tuple[list[Dataset], dict[str, Any]]:
        return build_results(data, results, seg)


@dataclass(frozen=True)
class ResultObject:
    """A built DICOM result as kept: its encoded bytes (sent as they are) and its data set read back from them."""

    data: bytes
    dataset: Dataset

    @classmethod
    def of(cls, ds: Dataset) -> ResultObject:
        data = _encode(ds)
        return cls(data, dcmread(io.BytesIO(data)))


def results_path(data_path: Path, sop_uid: str) -> Path:
    """Where the built results of ``sop_uid`` wait until delivered (the UID checked as for its instance file)."""
    return data_path / RESULTS_DIR / instance_path(data_path, sop_uid).stem


def _encode(ds: Dataset) -> bytes:
    if ds.get("Modality") == "SR":
        return encode_sr(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_results(
    data_path: Path, sop_uid: str, datasets: Sequence[Dataset], bundle: dict[str, Any]
) -> tuple[list[ResultObject], dict[str, Any]]:
    """Keep the built objects durably (files fsync'd in a temporary folder renamed into place, so a folder is
    whole or absent) and return them as read back, so the first attempt and every retry send the same bytes."""
    target = results_path(data_path, sop_uid)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=TMP_PREFIX))
    try:
        files = [(f"{i:02d}.dcm", _encode(ds)) for i, ds in enumerate(datasets)]
        files.append((BUNDLE_FILE, json.dumps(bundle, sort_keys=True).encode()))
        for name, body in files:
            with open(tmp / name, "wb") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if target.exists():  # a folder from an attempt that crashed before completing: it wins
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
            _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    saved = load_results(data_path, sop_uid)
    assert saved is not None
    return saved


def load_results(data_path: Path, sop_uid: str) -> tuple[list[ResultObject], dict[str, Any]] | None:
    """The results a previous attempt built for ``sop_uid``, or None when none was kept."""
    folder = results_path(data_path, sop_uid)
    if not folder.is_dir():
        return None
    objects = []
    for path in sorted(folder.glob("*.dcm")):
        data = path.read_bytes()
        objects.append(ResultObject(data, dcmread(io.BytesIO(data))))
    bundle: dict[str, Any] = json.loads((folder / BUNDLE_FILE).read_bytes())
    return objects, bundle


def discard_results(data_path: Path, sop_uid: str) -> None:
    """Remove the kept results of a delivered instance."""
    shutil.rmtree(results_path(data_path, sop_uid), ignore_errors=True)


def sweep_results(data_path: Path, queue: WorkQueue) -> int:
    """Remove kept results nobody will send again: half-written folders and those of instances the queue has as
    done or no longer knows (a crash between complete and the removal). A dead letter's stay for a retry."""
    root = data_path / RESULTS_DIR
    if not root.is_dir():
        return 0
    removed = 0
    for folder in root.iterdir():
        if folder.name.startswith(TMP_PREFIX):
            stale = time.time() - folder.stat().st_mtime > TMP_STALE_S
        else:
            item = queue.get(folder.name)
            stale = item is None or item.state == DONE
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def analysis_copy(data: bytes) -> bytes:
    """The instance as the analysis services get it with ``security.anonymize_dicom``: patient, institution and
    staff identifiers and private tags removed (UIDs kept), while the node keeps and answers with the original."""
    from cxr_serving.dicom import anonymize_dataset

    ds = dcmread(io.BytesIO(data))
    anonymize_dataset(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# The Patient, Patient Study and General Study module attributes a SEG takes from the node's original header, so
# a SEG built from an anonymized copy is filed under the source's patient and study (Type 2 ones stay, empty).
SOURCE_PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientComments",
    "EthnicGroup",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "StudyDescription",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingService",
    "ProcedureCodeSequence",
    "AdmittingDiagnosesDescription",
)
_TYPE2 = frozenset(DERIVED_TYPE2_KEYWORDS)


def copy_patient_and_study(target: Dataset, source: Dataset) -> Dataset:
    """Overwrite ``target``'s patient and study attributes with the source's (removing those the source lacks)."""
    for keyword in SOURCE_PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            setattr(target, keyword, copy.deepcopy(source[keyword].value))
        elif keyword in _TYPE2:
            setattr(target, keyword, "")
        elif keyword in target:
            delattr(target, keyword)
    return target


def set_instance_uids(ds: Dataset, series_instance_uid: str, sop_instance_uid: str) -> Dataset:
    """Give ``ds`` these Series and SOP Instance UIDs, the file meta's Media Storage SOP Instance UID included."""
    ds.SeriesInstanceUID = series_instance_uid
    ds.SOPInstanceUID = sop_instance_uid
    if hasattr(ds, "file_meta"):
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    return ds


def build_results(data: bytes, results: list[AlgorithmResult], seg: bytes) -> tuple[list[Dataset], dict[str, Any]]:
    """The SR, the SEG with Contributing Equipment, the bundle, all from ``data``, the original instance (the
    SEG's patient and study attributes are overwritten from it, as the service may have seen an anonymized
    copy); the SR's and the SEG's UIDs are fixed by the source and the algorithms (the SEG's replace the
    segmentation service's random ones), so a retried analysis sends the same objects again and a PACS keeps
    one of each."""
    source = dcmread(io.BytesIO(data), stop_before_pixels=True)
    study, sop = str(source.StudyInstanceUID), str(source.SOPInstanceUID)
    identity = algorithm_identity(results)
    sr = build_sr(
        source,
        results,
        series_instance_uid=result_uid(study, "sr-series", *identity),
        sop_instance_uid=result_uid(sop, "sr", *identity),
    )
    out: list[Dataset] = [sr]
    if seg:
        segmenter = algorithm_identity(results[-1:])
        seg_ds = set_instance_uids(
            copy_patient_and_study(dcmread(io.BytesIO(seg)), source),
            result_uid(study, "seg-series", *segmenter),
            result_uid(sop, "seg", *segmenter),
        )
        out.append(add_contributing_equipment(seg_ds, results[-1:]))
    bundle = build_bundle(source, results)
    return out, bundle
