"""Node settings seen only through a running node against real classification and segmentation services (small
untrained CPU models) and real HTTP destinations on 127.0.0.1: `analysis.api_key_file` rotated while the node runs,
`analysis.classification_models`, `destinations.fhir_url` with `fhir_headers`, and `stow_headers`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pydicom
import pytest

from cxr_classification.service import build_binding as classification_binding
from cxr_dicom.fhir import validate_bundle
from cxr_dicom.service import build_binding as dicom_binding
from cxr_protos.classification.v1 import classification_service_pb2 as cls_pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as cls_grpc
from cxr_protos.dicom.v1 import dicom_service_pb2 as pb
from cxr_protos.dicom.v1 import dicom_service_pb2_grpc as pb_grpc
from cxr_segmentation.service import build_binding as segmentation_binding
from tests.integration.test_dicom_node import (
    CLASSIFIERS,
    NODE_AE,
    SEGMENTATION,
    LoopThread,
    _start,
    c_store,
    copy_with_new_uids,
)
from tests.support.http_recorder import Recorder, multipart_datasets
from tests.support.paths import dicom_files
from tests.support.secret_volumes import kubelet_write
from tests.support.servers import auth, make_settings

OLD_KEY = "dicom-old-key-0123456789"
NEW_KEY = "dicom-new-key-9876543210"
WAIT_S = 180.0


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoopThread, int, int, Path]]:
    """Classification (binary and multiclass) and segmentation, both accepting the keys of one mounted file."""
    volume = tmp_path_factory.mktemp("service-keys")
    kubelet_write(volume, "2026_01_01_00_00_00.000000001", f"{OLD_KEY}\n")
    keys = {"security__api_keys": [], "security__api_key_file": str(volume / "api-keys")}
    loop = LoopThread()
    servers: list[Any] = []
    try:
        cls_s = make_settings(
            models=CLASSIFIERS, server_config__max_batch_delay_ms=2, performance__warmup_batches=0, **keys
        )
        seg_s = make_settings(models__segmentation=SEGMENTATION, server_config__max_batch_delay_ms=2, **keys)
        servers.append(loop.run(_start(cls_s, classification_binding(cls_s))))
        servers.append(loop.run(_start(seg_s, segmentation_binding(seg_s))))
        yield loop, servers[0].port, servers[1].port, volume
    finally:
        for server in reversed(servers):
            loop.run(server.stop(grace=1), timeout=60)
        loop.close()


def _accepted(port: int, key: str) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            cls_grpc.ClassificationServiceStub(ch).ListModels(
                cls_pb.ListModelsRequest(), metadata=(("x-api-key", key),), timeout=10
            )
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
            return False
    return True


def _wait_done(stub: pb_grpc.DicomServiceStub, study: str) -> pb.InstanceStatus:
    deadline = time.monotonic() + WAIT_S
    while True:
        answer = stub.GetStudyStatus(pb.GetStudyStatusRequest(study_instance_uid=study), metadata=auth(), timeout=10)
        if answer.finished:
            [instance] = answer.instances
            return instance
        assert time.monotonic() < deadline, f"study not finished in {WAIT_S}s: {answer}"
        time.sleep(0.25)


def _equipment(sr: pydicom.Dataset) -> set[str]:
    return {str(e.get("ManufacturerModelName", "")) for e in sr.ContributingEquipmentSequence}


def test_node_sends_the_rotated_key_the_configured_classifier_and_its_destination_headers(services, tmp_path):
    loop, cls_port, seg_port, service_keys = services
    node_keys = tmp_path / "node-keys"
    node_keys.mkdir()
    kubelet_write(node_keys, "2026_01_01_00_00_00.000000001", f"{OLD_KEY}\n")
    recorder = Recorder()
    settings = make_settings(
        data_path=str(tmp_path / "data"),
        models={
            "dicom": {
                "ae_title": NODE_AE,
                "dimse_port": 0,
                "stow_port": 0,
                "workers": 1,
                "max_attempts": 3,
                "retry_backoff_initial_s": 0.2,
                "retry_backoff_max_s": 0.5,
                "analysis": {
                    "classification_endpoint": f"127.0.0.1:{cls_port}",
                    "segmentation_endpoint": f"127.0.0.1:{seg_port}",
                    "api_key_file": str(node_keys / "api-keys"),
                    "classification_models": ["binary_classifier"],
                    "timeout_s": 60,
                },
                "destinations": {
                    "stow_url": recorder.url + "/dicom-web",
                    "stow_headers": {"X-Test": "stow-7"},
                    "fhir_url": recorder.url + "/fhir",
                    "fhir_headers": {"Authorization": "Bearer fhir-secret"},
                    "timeout_s": 30,
                },
            }
        },
    )
    try:
        server = loop.run(_start(settings, dicom_binding(settings)))
        node = server.binding.extra["node"]
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = pb_grpc.DicomServiceStub(ch)
                _, first = copy_with_new_uids(dicom_files()[0], tmp_path / "first")
                assert c_store(node.dimse_port, first) == 0x0000
                done = _wait_done(stub, first.StudyInstanceUID)
                assert (done.state, done.attempts) == (pb.INSTANCE_STATE_DONE, 1), done

                # what reached the destinations: the SR by STOW-RS with its header, the bundle with its own
                stows = [(h, b) for p, h, b in recorder.requests if p == "/dicom-web/studies"]
                fhirs = [(h, b) for p, h, b in recorder.requests if p == "/fhir/"]
                assert len(stows) == 1 and len(fhirs) == 1, [p for p, _, _ in recorder.requests]
                headers, body = stows[0]
                assert headers["X-Test"] == "stow-7"
                sent = {str(ds.Modality): ds for ds in multipart_datasets(headers["Content-Type"], body)}
                assert sorted(sent) == ["SEG", "SR"]
                sr = sent["SR"]
                assert sr.StudyInstanceUID == first.StudyInstanceUID
                models = _equipment(sr)
                assert "binary_classifier" in models and "multiclass_classifier" not in models, models
                headers, body = fhirs[0]
                assert headers["Authorization"] == "Bearer fhir-secret"
                bundle = json.loads(body)
                validate_bundle(bundle)
                study_id = bundle["entry"][-1]["resource"]["imagingStudy"][0]["identifier"]["value"]
                assert study_id == f"urn:oid:{first.StudyInstanceUID}"

                # the services' accepted key is rotated: the old key is refused from now on
                kubelet_write(service_keys, "2026_01_02_00_00_00.000000002", f"{NEW_KEY}\n")
                deadline = time.monotonic() + 15
                while _accepted(cls_port, OLD_KEY) or not _accepted(cls_port, NEW_KEY):
                    assert time.monotonic() < deadline, "the services did not rotate their key within 15 s"
                    time.sleep(0.25)
                # ...and so is the node's: the next study is analysed with the new key at its first attempt
                kubelet_write(node_keys, "2026_01_02_00_00_00.000000002", f"{NEW_KEY}\n")
                _, second = copy_with_new_uids(dicom_files()[0], tmp_path / "second")
                assert c_store(node.dimse_port, second) == 0x0000
                done = _wait_done(stub, second.StudyInstanceUID)
                assert (done.state, done.attempts) == (pb.INSTANCE_STATE_DONE, 1), done
                assert len([p for p, _, _ in recorder.requests if p == "/dicom-web/studies"]) == 2
        finally:
            loop.run(server.stop(grace=1), timeout=60)
    finally:
        recorder.close()
