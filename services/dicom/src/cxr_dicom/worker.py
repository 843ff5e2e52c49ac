"""The worker: claim an accepted instance, analyse it through the platform's public gRPC APIs, build the SR,
the SEG and the FHIR bundle, send them, and complete or fail the queue item (retries back off; the queue
dead-letters after ``max_attempts``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import socket
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import UID

from cxr_client.client import AsyncCxrClient
from cxr_client.config import ClientConfig
from cxr_dicom import audit_events, metrics
from cxr_dicom.codes import measurement_concept
from cxr_dicom.config import DestinationsConfig, DicomConfig
from cxr_dicom.fhir import build_bundle, post_bundle, write_bundle
from cxr_dicom.intake import instance_path
from cxr_dicom.results import Algorithm, AlgorithmResult, Finding, Measurement
from cxr_dicom.sr import add_contributing_equipment, build_sr, device_uid
from cxr_dicom.work_queue import Item, WorkQueue
from cxr_protos.classification.v1 import classification_service_pb2 as cls_pb
from cxr_protos.common.v1 import common_pb2
from cxr_protos.segmentation.v1 import segmentation_service_pb2 as seg_pb

log = logging.getLogger("cxr.dicom.worker")

IDLE_POLL_S = 0.2
PURGE_EVERY_S = 600.0


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
        key = next((ln.strip() for ln in a.api_key_file.read_text().splitlines() if ln.strip()), None)
    return base.model_copy(
        update={
            "endpoints": {**base.endpoints, **endpoints},
            "api_key": key or base.api_key,
            "timeout_s": a.timeout_s,
        }
    )


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


def result_uid(*parts: str) -> str:
    """A UID fixed by its parts: a retry sends the same SR, which a PACS then stores once."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'urn:cxr:dicom:' + '/'.join(parts)).int}"


class Senders:
    """The configured result destinations."""

    def __init__(self, dest: DestinationsConfig, calling_ae: str) -> None:
        self.dest = dest
        self.calling_ae = calling_ae

    def stow(self, datasets: Sequence[Dataset]) -> None:
        from dicomweb_client.api import DICOMwebClient

        assert self.dest.stow_url is not None
        client = DICOMwebClient(
            url=self.dest.stow_url, headers=dict(self.dest.stow_headers), timeout=self.dest.timeout_s
        )
        answer = client.store_instances(list(datasets))
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            raise RuntimeError(f"STOW-RS refused {len(failed)} result instance(s)")

    def cstore(self, datasets: Sequence[Dataset]) -> None:
        from pynetdicom import AE

        peer = self.dest.cstore
        assert peer is not None
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.dest.timeout_s
        for ds in datasets:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
        if not assoc.is_established:
            raise ConnectionError(f"C-STORE: no association with {peer.ae_title}@{peer.host}:{peer.port}")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = int(status.Status) if "Status" in status else -1
                if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                    raise RuntimeError(f"C-STORE of a {ds.Modality} result: status 0x{code & 0xFFFF:04X}")
        finally:
            assoc.release()

    def fhir(self, bundle: dict[str, Any], study_uid: str = "") -> None:
        if self.dest.fhir_folder is not None:
            with self._tracked(study_uid, "fhir_folder", self.dest.fhir_folder.absolute().as_uri(), ["fhir_bundle"]):
                write_bundle(bundle, self.dest.fhir_folder)
        if self.dest.fhir_url is not None:
            with self._tracked(study_uid, "fhir", self.dest.fhir_url, ["fhir_bundle"]):
                post_bundle(bundle, self.dest.fhir_url, timeout_s=self.dest.timeout_s)

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

    def send(self, datasets: Sequence[Dataset], bundle: dict[str, Any]) -> None:
        study_uid = str(datasets[0].StudyInstanceUID) if datasets else ""
        kinds = [metrics.object_kind(ds) for ds in datasets]
        if self.dest.stow_url is not None:
            with self._tracked(study_uid, "stow", self.dest.stow_url, kinds):
                self.stow(datasets)
        if self.dest.cstore is not None:
            peer = self.dest.cstore
            with self._tracked(study_uid, "cstore", f"{peer.ae_title}@{peer.host}:{peer.port}", kinds):
                self.cstore(datasets)
        self.fhir(bundle, study_uid)


class Worker:
    """``cfg.workers`` claim loops on the event loop; decoding, building and sending run in threads."""

    def __init__(self, cfg: DicomConfig, queue: WorkQueue, client: AsyncCxrClient) -> None:
        self.cfg = cfg
        self.queue = queue
        self.client = client
        self.senders = Senders(cfg.destinations, cfg.ae_title)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop(i), name=f"dicom-worker-{i}") for i in range(self.cfg.workers)]
        self._tasks.append(asyncio.create_task(self._purge_loop(), name="dicom-purge"))

    async def _purge_loop(self) -> None:
        """Forget finished rows older than ``done_retention_s`` (the idempotency window), so the queue stays small."""
        while not self._stopping.is_set():
            removed = await asyncio.to_thread(self.queue.purge_finished, self.cfg.done_retention_s)
            if removed:
                log.info("forgot finished instances", extra={"fields": {"removed": removed}})
            try:
                await asyncio.wait_for(self._stopping.wait(), PURGE_EVERY_S)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _loop(self, index: int) -> None:
        while not self._stopping.is_set():
            item = await asyncio.to_thread(self.queue.claim, f"{self.name}/{index}")
            if item is None:
                try:
                    await asyncio.wait_for(self._stopping.wait(), IDLE_POLL_S)
                except TimeoutError:
                    pass
                continue
            try:
                await self.process(item)
            except asyncio.CancelledError:
                await asyncio.to_thread(self.queue.release, item)  # shutdown: back to the queue unspent
                raise
            except Exception as exc:  # a failed attempt: retried with backoff, dead-lettered after max_attempts
                reason = f"{type(exc).__name__}: {exc}"[:2000]
                state = await asyncio.to_thread(self.queue.fail, item, reason, self.cfg.backoff_s(item.attempts))
                log.warning(
                    "an instance failed", extra={"fields": {"attempt": item.attempts, "state": state, "reason": reason}}
                )
            else:
                if await asyncio.to_thread(self.queue.complete, item):
                    await asyncio.to_thread(metrics.result_delivered, self.queue, item.sop_uid, item.priority)
                    path = instance_path(self.cfg.data_path, item.sop_uid)
                    path.unlink(missing_ok=True)
                    log.info(
                        "results sent",
                        extra={"fields": {"attempts": item.attempts, "priority": item.priority.name.lower()}},
                    )

    async def process(self, item: Item) -> None:
        payload = json.loads(item.payload)
        data = (self.cfg.data_path / payload["file"]).read_bytes()
        image = common_pb2.Image(data=data, content_type="application/dicom")
        cls_reply, seg_reply = await asyncio.gather(
            self.client.classify(image, model_names=self.cfg.analysis.classification_models),
            self.client.segment(image, mask_encoding="none", include_dicom_seg=True),
        )
        results = [*classification_results(cls_reply), segmentation_result(seg_reply)]
        datasets, bundle = await asyncio.to_thread(self.build, data, results, seg_reply.dicom_seg)
        await asyncio.to_thread(self.senders.send, datasets, bundle)

    def build(self, data: bytes, results: list[AlgorithmResult], seg: bytes) -> tuple[list[Dataset], dict[str, Any]]:
        return build_results(data, results, seg)


def algorithm_identity(results: Sequence[AlgorithmResult]) -> list[str]:
    """What fixes a result object's UIDs besides its source: each algorithm's device UID (name and checkpoint),
    version and operating thresholds, so new weights, a new version or new thresholds (other decisions in the
    SR) give new objects, and a retry the same ones."""
    return [f"{device_uid(r.algorithm)}@{r.algorithm.version}{_thresholds(r)}" for r in results]


def _thresholds(result: AlgorithmResult) -> str:
    if not result.findings:
        return ""
    pairs = sorted(f"{f.label}={f.threshold!r}" for f in result.findings)
    return "#" + hashlib.sha256(";".join(pairs).encode()).hexdigest()[:16]


def set_instance_uids(ds: Dataset, series_instance_uid: str, sop_instance_uid: str) -> Dataset:
    """Give ``ds`` these Series and SOP Instance UIDs, the file meta's Media Storage SOP Instance UID included."""
    ds.SeriesInstanceUID = series_instance_uid
    ds.SOPInstanceUID = sop_instance_uid
    if hasattr(ds, "file_meta"):
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    return ds


def build_results(data: bytes, results: list[AlgorithmResult], seg: bytes) -> tuple[list[Dataset], dict[str, Any]]:
    """The SR, the SEG with Contributing Equipment, the bundle; the SR's and the SEG's UIDs are fixed by the
    source and the algorithms (the SEG's replace the segmentation service's random ones), so a retried
    analysis sends the same objects again and a PACS keeps one of each."""
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
            dcmread(io.BytesIO(seg)),
            result_uid(study, "seg-series", *segmenter),
            result_uid(sop, "seg", *segmenter),
        )
        out.append(add_contributing_equipment(seg_ds, results[-1:]))
    bundle = build_bundle(source, results)
    return out, bundle
