"""A retried delivery resends the results the first attempt built, byte for byte, on the real stack of
test_dicom_node (real classification and segmentation services): the SR and the SEG go to a recording STOW-RS
endpoint, the first attempt fails after it (the FHIR folder is a file), the retry succeeds, and the kept
results are gone once the instance is done."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import grpc
import pydicom

from cxr_dicom.service import build_binding as dicom_binding
from cxr_protos.dicom.v1 import dicom_service_pb2 as pb
from cxr_protos.dicom.v1 import dicom_service_pb2_grpc as pb_grpc
from tests.support.dicom_node import (
    WAIT_S,
    LoopThread,
    Stack,
    c_store,
    copy_with_new_uids,
    node_settings,
    start_server,
)
from tests.support.http_recorder import recording_server
from tests.support.paths import dicom_files
from tests.support.servers import auth


def test_a_retry_resends_the_first_build_byte_for_byte_and_completion_removes_it(stack: Stack, tmp_path: Path):
    blocker = tmp_path / "fhir"
    blocker.write_text("not a folder")  # write_bundle cannot create the folder: the attempt fails after STOW
    loop = LoopThread()
    with recording_server() as recorder:
        destinations = {"stow_url": recorder.url + "/dicom-web", "fhir_folder": str(blocker), "timeout_s": 30}
        settings = node_settings(
            tmp_path, None, *stack.analysis_ports, workers=1, max_attempts=10, destinations=destinations
        )
        try:
            server = loop.run(start_server(settings, dicom_binding(settings)))
            node = server.binding.extra["node"]
            results_root = node.cfg.data_path / "results"
            try:
                _, ds = copy_with_new_uids(dicom_files()[0], tmp_path / "src")
                assert c_store(node.dimse_port, ds) == 0x0000
                with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                    stub = pb_grpc.DicomServiceStub(ch)

                    def instance() -> pb.InstanceStatus:
                        answer = stub.GetStudyStatus(
                            pb.GetStudyStatusRequest(study_instance_uid=ds.StudyInstanceUID),
                            metadata=auth(),
                            timeout=10,
                        )
                        return answer.instances[0]

                    deadline = time.monotonic() + WAIT_S
                    while not (instance().last_error and recorder.stow_bodies()):
                        assert time.monotonic() < deadline, "no failed attempt after the STOW"
                        time.sleep(0.2)
                    kept = sorted(p.name for p in (results_root / ds.SOPInstanceUID).iterdir())
                    assert kept == ["00.dcm", "01.dcm", "bundle.json"]  # SR, SEG, FHIR bundle
                    blocker.unlink()
                    while (state := instance()).state != pb.INSTANCE_STATE_DONE:
                        assert state.state != pb.INSTANCE_STATE_DEAD, state.last_error
                        assert time.monotonic() < deadline, "the retry did not finish"
                        time.sleep(0.2)
                assert state.attempts >= 2, state
            finally:
                loop.run(server.stop(grace=1), timeout=60)
        finally:
            loop.close()
    assert len(recorder.stow_bodies()) == state.attempts  # one STOW per attempt
    first = recorder.stow_parts(0)
    assert [pydicom.dcmread(io.BytesIO(p)).Modality for p in first] == ["SR", "SEG"]
    for later in range(1, len(recorder.stow_bodies())):
        assert recorder.stow_parts(later) == first  # the same objects, byte for byte
    assert not (results_root / ds.SOPInstanceUID).exists()
    assert [p.name for p in results_root.iterdir()] == []
    [bundle] = [json.loads(p.read_text()) for p in (tmp_path / "fhir").glob("*.json")]
    assert bundle["resourceType"] == "Bundle"


def test_the_next_instance_is_analysed_while_the_last_ones_results_are_being_sent(stack: Stack, tmp_path: Path):
    """One worker (``workers`` 1) and a STOW-RS endpoint that holds every request unanswered: while the first
    instance's request is held, the second instance is claimed (its analysis slot is free once the first one's
    services answered); without the pipeline it stays queued until the first is delivered. Released, both finish,
    and each one's SR and SEG reach the endpoint."""
    loop = LoopThread()
    with recording_server() as recorder:
        recorder.hold.clear()
        destinations = {"stow_url": recorder.url + "/dicom-web", "fhir_folder": str(tmp_path / "fhir"), "timeout_s": 60}
        settings = node_settings(tmp_path, None, *stack.analysis_ports, workers=1, destinations=destinations)
        try:
            server = loop.run(start_server(settings, dicom_binding(settings)))
            node = server.binding.extra["node"]
            try:
                sent = [copy_with_new_uids(dicom_files()[i], tmp_path / f"src{i}")[1] for i in range(2)]
                for ds in sent:
                    assert c_store(node.dimse_port, ds) == 0x0000
                with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                    stub = pb_grpc.DicomServiceStub(ch)

                    def status(ds: pydicom.Dataset) -> pb.GetStudyStatusResponse:
                        return stub.GetStudyStatus(
                            pb.GetStudyStatusRequest(study_instance_uid=ds.StudyInstanceUID),
                            metadata=auth(),
                            timeout=10,
                        )

                    deadline = time.monotonic() + WAIT_S
                    while not (recorder.stow_bodies() and status(sent[1]).in_progress == 1):
                        assert time.monotonic() < deadline, (
                            f"second instance {status(sent[1])} while the first one's STOW-RS request was held"
                        )
                        time.sleep(0.2)
                    assert len(recorder.stow_bodies()) == 1  # the first one's request, still held
                    recorder.hold.set()
                    for ds in sent:
                        while not (answer := status(ds)).finished:
                            assert time.monotonic() < deadline, "not finished after the release"
                            time.sleep(0.2)
                        assert (answer.done, answer.dead) == (1, 0), answer
            finally:
                recorder.hold.set()
                loop.run(server.stop(grace=1), timeout=60)
        finally:
            loop.close()
    studies = [
        {pydicom.dcmread(io.BytesIO(part)).StudyInstanceUID for part in recorder.stow_parts(i)}
        for i in range(len(recorder.stow_bodies()))
    ]
    assert studies == [{ds.StudyInstanceUID} for ds in sent]  # one request each, the first one's first
