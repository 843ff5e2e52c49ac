"""The DICOM node's test stack (real Orthanc, real classification and segmentation services with small
untrained CPU models, the node in-process) and the senders the node tests share; every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE

from cxr_classification.service import build_binding as classification_binding
from cxr_dicom.service import build_binding as dicom_binding
from cxr_protos.dicom.v1 import dicom_service_pb2 as pb
from cxr_protos.dicom.v1 import dicom_service_pb2_grpc as pb_grpc
from cxr_segmentation.service import build_binding as segmentation_binding
from cxr_serving.server import create_server
from tests.support.orthanc import Orthanc, require, run_orthanc
from tests.support.servers import TEST_KEY, auth, make_settings

NODE_AE = "CXRNODE"
WAIT_S = 240.0
CLASSIFIERS = {
    "binary_classifier": {"model_type": "swin_transformer", "allow_untrained": True, "input_size": 64},
    "multiclass_classifier": {"model_type": "densenet121", "allow_untrained": True, "input_size": 64},
}
SEGMENTATION = {"enabled": True, "allow_untrained": True, "input_size": 64, "encoder": "resnet18"}


class LoopThread:
    """An event loop in a thread, so servers live for the whole module while the tests stay synchronous."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 180) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def start_server(settings: Any, binding: Any) -> Any:
    server = create_server(settings, binding, host="127.0.0.1", port=0, metrics_port=0)
    await server.start()
    await server.wait_until_ready(150)
    return server


def node_settings(data: Path, orthanc: Orthanc | None, cls_port: int, seg_port: int, **dicom: Any) -> Any:
    destinations: dict[str, Any] = {"fhir_folder": str(data / "fhir"), "timeout_s": 30}
    if orthanc is not None:
        destinations["stow_url"] = orthanc.dicomweb_url
        destinations["cstore"] = {"host": "127.0.0.1", "port": orthanc.dicom_port, "ae_title": orthanc.ae_title}
    else:
        destinations["stow_url"] = "http://127.0.0.1:9/dicom-web"  # discard port: nothing listens
    cfg = {
        "ae_title": NODE_AE,
        "dimse_port": 0,
        "stow_port": 0,
        "data_path": str(data / "node"),
        "accepted_calling_ae_titles": ["MODALITY", "STORESCU", "ER_DX"],
        "priority_rules": [{"calling_ae_titles": ["ER_DX"], "priority": "stat"}],
        "workers": 2,
        "retry_backoff_initial_s": 0.2,
        "retry_backoff_max_s": 1.0,
        "analysis": {
            "classification_endpoint": f"127.0.0.1:{cls_port}",
            "segmentation_endpoint": f"127.0.0.1:{seg_port}",
            "api_key": TEST_KEY,
            "timeout_s": 60,
        },
        "destinations": destinations,
        **dicom,
    }
    return make_settings(models={"dicom": cfg})


class Stack:
    def __init__(self, loop: LoopThread, orthanc: Orthanc, node_server: Any, data: Path) -> None:
        self.loop = loop
        self.orthanc = orthanc
        self.server = node_server
        self.node = node_server.binding.extra["node"]
        self.analysis_ports = (0, 0)
        self.data = data
        self.channel = grpc.insecure_channel(f"127.0.0.1:{node_server.port}")
        self.stub = pb_grpc.DicomServiceStub(self.channel)

    def status(self, study: str) -> pb.GetStudyStatusResponse:
        return self.stub.GetStudyStatus(pb.GetStudyStatusRequest(study_instance_uid=study), metadata=auth(), timeout=10)

    def orthanc_sr_count(self, study: str) -> int:
        return sum(1 for ds in orthanc_instances(self.orthanc, study) if ds.Modality == "SR")

    def wait_finished(self, studies: list[str], timeout: float = WAIT_S) -> dict[str, pb.GetStudyStatusResponse]:
        deadline = time.monotonic() + timeout
        while True:
            answers = {s: self.status(s) for s in studies}
            if all(a.finished for a in answers.values()):
                return answers
            if time.monotonic() > deadline:
                pending = {s: (a.queued, a.in_progress) for s, a in answers.items() if not a.finished}
                raise AssertionError(f"studies not finished in {timeout}s: {pending}")
            time.sleep(0.25)


@contextlib.contextmanager
def running_dicom_stack(root: Path) -> Iterator[Stack]:
    """Orthanc, classification, segmentation and the node, started once and stopped in reverse order."""
    require("storescu")
    loop = LoopThread()
    servers: list[Any] = []
    try:
        with run_orthanc(root / "orthanc") as orthanc:
            cls_s = make_settings(
                models=CLASSIFIERS, server_config__max_batch_delay_ms=2, performance__warmup_batches=0
            )
            seg_s = make_settings(models__segmentation=SEGMENTATION, server_config__max_batch_delay_ms=2)
            servers.append(loop.run(start_server(cls_s, classification_binding(cls_s))))
            servers.append(loop.run(start_server(seg_s, segmentation_binding(seg_s))))
            node_s = node_settings(root, orthanc, servers[0].port, servers[1].port)
            servers.append(loop.run(start_server(node_s, dicom_binding(node_s))))
            stack = Stack(loop, orthanc, servers[-1], root)
            stack.analysis_ports = (servers[0].port, servers[1].port)
            try:
                yield stack
            finally:
                stack.channel.close()
                for server in reversed(servers):  # the node stops while Orthanc still runs
                    loop.run(server.stop(grace=1), timeout=60)
                servers.clear()
    finally:
        for server in reversed(servers):
            loop.run(server.stop(grace=1), timeout=60)
        loop.close()


def copy_with_new_uids(path: Path, out_dir: Path) -> tuple[Path, pydicom.Dataset]:
    """The shared file as a new study (new Study/Series/SOP UIDs), so each intake route analyses its own copy."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / path.name
    ds.save_as(target, enforce_file_format=True)
    return target, ds


def c_store(port: int, ds: pydicom.Dataset, calling: str = "MODALITY") -> int:
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def stow(port: int, parts: list[tuple[str, bytes]], key: str | None = TEST_KEY) -> httpx.Response:
    boundary = "cxr-test-boundary-8c1f"
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: " + ct.encode() + b"\r\n\r\n" + data + b"\r\n"
        for ct, data in parts
    )
    body += b"--" + boundary.encode() + b"--\r\n"
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    if key is not None:
        headers["x-api-key"] = key
    return httpx.post(f"http://127.0.0.1:{port}/dicom-web/studies", content=body, headers=headers, timeout=120)


def orthanc_instances(orthanc: Orthanc, study: str) -> list[pydicom.Dataset]:
    found = httpx.post(
        orthanc.url + "/tools/find",
        json={"Level": "Instance", "Query": {"StudyInstanceUID": study}},
        timeout=30,
    ).json()
    out = []
    for orthanc_id in found:
        data = httpx.get(f"{orthanc.url}/instances/{orthanc_id}/file", timeout=30).content
        out.append(pydicom.dcmread(io.BytesIO(data)))
    return out


def fhir_bundles(stack: Stack) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((stack.data / "fhir").glob("*.json"))]


def encode(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
