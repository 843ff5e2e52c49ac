"""The DICOM node end to end: real classification and segmentation services (small untrained CPU models), the node
(C-STORE SCP, STOW-RS, workers, gRPC API) and a real Orthanc receiving the SR and SEG by STOW-RS and C-STORE.

One Orthanc and one set of services for the whole session (tests/integration/conftest.py); every wait is bounded."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import highdicom as hd
import pydicom
import pytest
from pynetdicom import AE

from cxr_dicom.fhir import validate_bundle
from cxr_dicom.results import NOT_FOR_DIAGNOSTIC_USE
from cxr_dicom.service import build_binding as dicom_binding
from cxr_protos.dicom.v1 import dicom_service_pb2 as pb
from cxr_protos.dicom.v1 import dicom_service_pb2_grpc as pb_grpc
from tests.support.dicom_node import (
    NODE_AE,
    WAIT_S,
    LoopThread,
    Stack,
    c_store,
    copy_with_new_uids,
    encode,
    fhir_bundles,
    node_settings,
    orthanc_instances,
    start_server,
    stow,
)
from tests.support.paths import REPO, dicom_files
from tests.support.servers import auth

STORESCU_PROPOSE = {"1.2.840.10008.1.2.5": "--propose-rle", "1.2.840.10008.1.2.4.50": "--propose-jpeg8"}


def test_every_shared_radiograph_by_pynetdicom_storescu_and_stow_gets_sr_seg_and_fhir(stack, tmp_path):
    sources: dict[str, pydicom.Dataset] = {}
    # pynetdicom SCU
    for path in dicom_files():
        _, ds = copy_with_new_uids(path, tmp_path / "scu")
        assert c_store(stack.node.dimse_port, ds) == 0x0000
        sources[ds.StudyInstanceUID] = ds
    # DCMTK storescu, offering each file's own transfer syntax (it cannot transcode RLE itself)
    copies = [copy_with_new_uids(p, tmp_path / "storescu") for p in dicom_files()]
    for path, ds in copies:
        propose = STORESCU_PROPOSE.get(str(ds.file_meta.TransferSyntaxUID), "--propose-uncompr")
        run = subprocess.run(
            [
                "storescu",
                propose,
                "-aet",
                "STORESCU",
                "-aec",
                NODE_AE,
                "127.0.0.1",
                str(stack.node.dimse_port),
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0 and "Store Failed" not in run.stderr, run.stderr
    sources.update({ds.StudyInstanceUID: ds for _, ds in copies})
    # STOW-RS, every file in one request
    copies = [copy_with_new_uids(p, tmp_path / "stow") for p in dicom_files()]
    answer = stow(stack.node.stow_port, [("application/dicom", p.read_bytes()) for p, _ in copies])
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/dicom+json")
    referenced = pydicom.Dataset.from_json(answer.json()).ReferencedSOPSequence
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced} == {ds.SOPInstanceUID for _, ds in copies}
    sources.update({ds.StudyInstanceUID: ds for _, ds in copies})
    assert len(sources) == 3 * len(dicom_files())

    answers = stack.wait_finished(list(sources))
    for study, status in answers.items():
        assert (status.done, status.dead, len(status.instances)) == (1, 0, 1), status
        assert status.instances[0].state == pb.INSTANCE_STATE_DONE
        assert status.instances[0].sop_instance_uid == sources[study].SOPInstanceUID

    bundles = {b["entry"][-1]["resource"]["imagingStudy"][0]["identifier"]["value"]: b for b in fhir_bundles(stack)}
    for study, source in sources.items():
        stored = orthanc_instances(stack.orthanc, study)
        by_modality = {str(ds.Modality): ds for ds in stored}
        assert sorted(by_modality) == ["SEG", "SR"] and len(stored) == 2, [ds.Modality for ds in stored]
        sr = hd.sr.srread(io.BytesIO(encode(by_modality["SR"])))
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.StudyInstanceUID == study
        series = evidence.ReferencedSeriesSequence[0]
        assert series.SeriesInstanceUID == source.SeriesInstanceUID
        assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert NOT_FOR_DIAGNOSTIC_USE in sr.SeriesDescription
        models = {str(e.get("ManufacturerModelName", "")) for e in sr.ContributingEquipmentSequence}
        assert {"binary_classifier", "multiclass_classifier", "segmentation"} <= models, models
        seg = hd.seg.segread(io.BytesIO(encode(by_modality["SEG"])))
        refs = [i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence]
        assert refs == [source.SOPInstanceUID]
        assert NOT_FOR_DIAGNOSTIC_USE in seg.SeriesDescription
        assert [str(e.ManufacturerModelName) for e in seg.ContributingEquipmentSequence][-1] == "segmentation"
        bundle = bundles[f"urn:oid:{study}"]
        validate_bundle(bundle)
        assert NOT_FOR_DIAGNOSTIC_USE in bundle["entry"][-1]["resource"]["conclusion"]


def test_a_duplicate_send_is_analysed_once(stack, tmp_path):
    path, ds = copy_with_new_uids(dicom_files()[0], tmp_path)
    assert c_store(stack.node.dimse_port, ds) == 0x0000
    stack.wait_finished([ds.StudyInstanceUID])
    assert c_store(stack.node.dimse_port, ds) == 0x0000  # a re-send is acknowledged...
    answer = stow(stack.node.stow_port, [("application/dicom", path.read_bytes())])
    assert answer.status_code == 200
    time.sleep(1.0)  # ...and would be claimed within this time if it had been queued again
    status = stack.wait_finished([ds.StudyInstanceUID])[ds.StudyInstanceUID]
    assert (status.done, len(status.instances), status.instances[0].attempts) == (1, 1, 1)
    assert sorted(str(d.Modality) for d in orthanc_instances(stack.orthanc, ds.StudyInstanceUID)) == ["SEG", "SR"]


def test_non_images_and_corrupt_files_are_refused_with_their_status(stack, tmp_path):
    from pydicom.data import get_testdata_file
    from pynetdicom import AE

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ct.SOPClassUID, ct.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", stack.node.dimse_port, ae_title=NODE_AE)
    assert assoc.is_established  # every storage class is negotiated: the answer comes per instance
    try:
        answer = assoc.send_c_store(ct)
    finally:
        assoc.release()
    # PS3.4 B.2.3: the Storage Service Class's "Data Set does not match SOP Class", with the reason
    assert int(answer.Status) == 0xA900
    assert answer.ErrorComment.startswith("CT Image Storage is not a projection radiograph")
    good = dicom_files()[0].read_bytes()
    truncated = good[: len(good) // 2]
    answer = stow(stack.node.stow_port, [("application/dicom", truncated), ("application/dicom", b"not dicom")])
    assert answer.status_code == 409, answer.text
    failed = pydicom.Dataset.from_json(answer.json()).FailedSOPSequence
    assert [int(i.FailureReason) for i in failed] == [0xC000, 0xC000]
    # nothing refused was queued
    assert not list((stack.data / "node" / "instances").glob(f"{ct.SOPInstanceUID}*"))


def test_stow_needs_the_api_key_and_dimse_the_accepted_calling_ae(stack, tmp_path):
    _, ds = copy_with_new_uids(dicom_files()[0], tmp_path)
    assert stow(stack.node.stow_port, [("application/dicom", encode(ds))], key=None).status_code == 401
    assert stow(stack.node.stow_port, [("application/dicom", encode(ds))], key="wrong").status_code == 401
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", stack.node.dimse_port, ae_title=NODE_AE)
    assert assoc.is_rejected
    with pytest.raises(grpc.RpcError) as err:
        stack.status(ds.StudyInstanceUID)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # nothing of the refused sends was accepted


def test_full_queue_pushes_back_and_failures_reach_the_dead_letter(tmp_path):
    """No model services and no PACS: every attempt fails as UNAVAILABLE (transient, no attempt spent), so
    accepted items stay pending and die once their failures have lasted max_transient_retry_s (2 s).

    The 3 s backoff keeps the first item pending while the second is sent (two attempts that fail at once with
    a 0.2 s backoff could dead-letter it first and make room)."""
    loop = LoopThread()
    settings = node_settings(
        tmp_path,
        None,
        9,
        9,
        max_queue_size=1,
        max_attempts=2,
        max_transient_retry_s=2.0,
        workers=1,
        retry_backoff_initial_s=3.0,
        retry_backoff_max_s=3.0,
    )
    try:
        server = loop.run(start_server(settings, dicom_binding(settings)))
        node = server.binding.extra["node"]
        try:
            _, ds1 = copy_with_new_uids(dicom_files()[0], tmp_path / "a")
            _, ds2 = copy_with_new_uids(dicom_files()[1], tmp_path / "b")
            assert c_store(node.dimse_port, ds1) == 0x0000
            assert c_store(node.dimse_port, ds2) == 0xA700  # out of resources: the sender keeps it
            answer = stow(node.stow_port, [("application/dicom", encode(ds2))])
            assert answer.status_code == 503 and int(answer.headers["Retry-After"]) > 0
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = pb_grpc.DicomServiceStub(ch)
                deadline = time.monotonic() + 60
                while True:
                    dead = stub.ListDeadLetters(pb.ListDeadLettersRequest(), metadata=auth(), timeout=10)
                    if dead.instances or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                assert [i.sop_instance_uid for i in dead.instances] == [ds1.SOPInstanceUID]
                assert dead.instances[0].attempts == 1  # transient: the second failure gave up, spending none
                assert "transient failures for" in dead.instances[0].last_error
                # the queue has room again: the second instance is accepted now
                assert c_store(node.dimse_port, ds2) == 0x0000
                retried = stub.RetryDeadLetter(
                    pb.RetryDeadLetterRequest(sop_instance_uid=ds1.SOPInstanceUID), metadata=auth(), timeout=10
                )
                assert retried.requeued
        finally:
            loop.run(server.stop(grace=1), timeout=60)
    finally:
        loop.close()


def _wait_serving(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"the node did not serve in {timeout}s: {log.read_text()[-3000:]}")


def c_store_many(port: int, datasets: list[pydicom.Dataset], calling: str = "MODALITY") -> list[int]:
    """C-STORE each dataset over one association (a modality sending a batch)."""
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _routine_results_before_stat(log: Path, deadline: float) -> int:
    """How many routine items the node's JSON log says were sent before the first STAT item. The line follows the
    queue's record of the item by a few awaits (a status may say done first), so the log is read until it is there."""
    while True:
        count = 0
        for line in log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # a line still being written: counted on the next read
                continue
            if not isinstance(entry, dict) or entry.get("msg") != "results sent":
                continue
            if entry.get("priority") == "stat":
                return count
            count += 1
        assert time.monotonic() < deadline, "the node's log has no 'results sent' line for the STAT study"
        time.sleep(0.05)


def test_stat_behind_twenty_routine_goes_first_and_a_kill_9_loses_nothing(stack, tmp_path):
    """A running node process (one worker) receives 20 routine studies by C-STORE; once the first is being analysed,
    a STAT study arrives by C-STORE from the calling AE title the priority rule makes STAT. It is done before every
    routine study that was still queued when it arrived (at least 15 of the 20). Killed with SIGKILL mid-queue,
    the restarted process finishes every study, each SR stored once."""
    import os
    import signal

    from tests.support.processes import clean_env
    from tests.support.servers import free_port

    grpc_port, dimse_port = free_port(), free_port()
    settings = node_settings(
        tmp_path, stack.orthanc, *stack.analysis_ports, workers=1, dimse_port=dimse_port, lease_s=150
    )
    data = settings.model_dump(mode="json")
    data["services"]["dicom"] = {"host": "127.0.0.1", "port": grpc_port, "metrics_port": 0}
    config = tmp_path / "node.json"
    config.write_text(json.dumps(data))
    routine_ds = [copy_with_new_uids(dicom_files()[0], tmp_path / f"r{i}")[1] for i in range(20)]
    _, stat_ds = copy_with_new_uids(dicom_files()[0], tmp_path / "stat")
    routine = [ds.StudyInstanceUID for ds in routine_ds]
    studies = [*routine, stat_ds.StudyInstanceUID]
    env = clean_env()
    log = tmp_path / "node.log"

    def start() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "cxr_serving", "dicom", "--config", str(config)],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        _wait_serving(grpc_port, process, log)
        return process

    process = start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            stub = pb_grpc.DicomServiceStub(ch)

            def statuses(which: list[str]) -> dict[str, pb.GetStudyStatusResponse]:
                return {
                    s: stub.GetStudyStatus(pb.GetStudyStatusRequest(study_instance_uid=s), metadata=auth(), timeout=10)
                    for s in which
                }

            def done() -> dict[str, bool]:
                return {s: a.done == 1 for s, a in statuses(studies).items()}

            assert c_store_many(dimse_port, routine_ds) == [0x0000] * 20
            deadline = time.monotonic() + WAIT_S
            while not any(a.in_progress for a in statuses(routine).values()):  # the first one, normally
                assert time.monotonic() < deadline, "no routine study was ever in progress"
                time.sleep(0.05)
            assert c_store(dimse_port, stat_ds, calling="ER_DX") == 0x0000
            waiting = [s for s, a in statuses(routine).items() if a.queued == 1]
            print(f"routine studies still queued when the STAT one arrived: {len(waiting)} of 20")
            assert len(waiting) >= 15, f"only {len(waiting)} routine studies were still queued when STAT arrived"
            while not done()[stat_ds.StudyInstanceUID]:
                assert time.monotonic() < deadline, "the STAT study did not finish"
                time.sleep(0.1)
            # STAT was claimed next: only routine studies claimed before it arrived may finish before it. The
            # node's log orders the completions (reading 21 statuses after STAT's would race the next study).
            before_stat = _routine_results_before_stat(log, deadline)
            assert before_stat <= 20 - len(waiting), (
                f"{before_stat} routine studies finished before the STAT one; only {20 - len(waiting)} were"
                " claimed before it arrived"
            )
            while sum(done().values()) < 4:
                assert time.monotonic() < deadline, "the node stopped making progress"
                time.sleep(0.1)
            process.send_signal(signal.SIGKILL)
            process.wait(30)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(30)
    remaining = [s for s in studies if stack.orthanc_sr_count(s) == 0]
    assert remaining, "every study finished before the kill: nothing was left mid-queue"
    process = start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            stub = pb_grpc.DicomServiceStub(ch)
            deadline = time.monotonic() + WAIT_S
            while True:
                answers = [
                    stub.GetStudyStatus(pb.GetStudyStatusRequest(study_instance_uid=s), metadata=auth(), timeout=10)
                    for s in studies
                ]
                if all(a.finished for a in answers):
                    break
                assert time.monotonic() < deadline, "the restarted node did not finish every study"
                time.sleep(0.25)
        assert all(a.done == 1 for a in answers)
        for study in studies:
            assert stack.orthanc_sr_count(study) == 1, study
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


def _orthanc_modalities(stack: Stack, study: str) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list[pydicom.Dataset]] = {}
    for ds in orthanc_instances(stack.orthanc, study):
        out.setdefault(str(ds.Modality), []).append(ds)
    return out


def test_a_retry_after_the_seg_was_stored_leaves_one_seg_and_one_sr_in_the_pacs(stack, tmp_path):
    """The SR and the SEG reach Orthanc (STOW-RS and C-STORE), then the FHIR delivery fails (its folder is a file)
    so the attempt fails and the image is analysed again; once the folder can be written, Orthanc holds exactly
    one SEG and one SR for the image, each referencing it, and the folder one bundle."""
    settings = node_settings(
        tmp_path, stack.orthanc, *stack.analysis_ports, workers=1, max_attempts=10, retry_backoff_max_s=1.0
    )
    blocker = tmp_path / "fhir"
    blocker.write_text("not a folder")  # write_bundle cannot create the folder: the delivery fails
    loop = LoopThread()
    try:
        server = loop.run(start_server(settings, dicom_binding(settings)))
        node = server.binding.extra["node"]
        try:
            _, ds = copy_with_new_uids(dicom_files()[0], tmp_path / "src")
            study = ds.StudyInstanceUID
            assert c_store(node.dimse_port, ds) == 0x0000
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = pb_grpc.DicomServiceStub(ch)

                def instance() -> pb.InstanceStatus:
                    answer = stub.GetStudyStatus(
                        pb.GetStudyStatusRequest(study_instance_uid=study), metadata=auth(), timeout=10
                    )
                    return answer.instances[0]

                deadline = time.monotonic() + WAIT_S
                while not (instance().last_error and "SEG" in _orthanc_modalities(stack, study)):
                    assert time.monotonic() < deadline, "no failed attempt after the SEG was stored"
                    time.sleep(0.2)
                blocker.unlink()
                while (state := instance()).state != pb.INSTANCE_STATE_DONE:
                    assert state.state != pb.INSTANCE_STATE_DEAD, state.last_error
                    assert time.monotonic() < deadline, "the retry did not finish"
                    time.sleep(0.2)
            assert state.attempts >= 2, state  # analysed (and sent) at least twice
        finally:
            loop.run(server.stop(grace=1), timeout=60)
    finally:
        loop.close()
    stored = _orthanc_modalities(stack, study)
    assert {m: len(v) for m, v in stored.items()} == {"SEG": 1, "SR": 1}
    [seg], [sr] = stored["SEG"], stored["SR"]
    assert seg.file_meta.MediaStorageSOPInstanceUID == seg.SOPInstanceUID
    refs = [i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence]
    assert refs == [ds.SOPInstanceUID] and seg.StudyInstanceUID == study
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == study
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert len(list((tmp_path / "fhir").glob("*.json"))) == 1


LONG_LEASE_S = 600.0
RESTART_BOUND_S = 120.0


def test_a_node_killed_mid_analysis_with_a_600s_lease_finishes_every_study_soon_after_restart(stack, tmp_path):
    """A node process (2 workers, lease 600 s) is killed with SIGKILL while it analyses; a second node on the same
    queue is refused while the first lives. Restarted, it finishes every study within 120 s of the restart (the
    killed claims are taken back at start, not after 600 s); each study has one SR and one SEG in Orthanc and
    only the killed claims were analysed twice."""
    import os
    import signal

    from cxr_dicom.config import dicom_config
    from cxr_dicom.intake import Intake
    from cxr_dicom.service import DicomNode
    from cxr_dicom.work_queue import CLAIMED, QueueLockedError, WorkQueue
    from tests.support.processes import clean_env
    from tests.support.servers import free_port

    grpc_port = free_port()
    settings = node_settings(
        tmp_path, stack.orthanc, *stack.analysis_ports, workers=2, dimse_port=free_port(), lease_s=LONG_LEASE_S
    )
    data = settings.model_dump(mode="json")
    data["services"]["dicom"] = {"host": "127.0.0.1", "port": grpc_port, "metrics_port": 0}
    config = tmp_path / "node.json"
    config.write_text(json.dumps(data))
    cfg = dicom_config(settings)
    sources = [copy_with_new_uids(dicom_files()[i % len(dicom_files())], tmp_path / f"s{i}")[0] for i in range(8)]
    with WorkQueue(cfg.data_path, max_pending=cfg.max_queue_size) as queue:
        intake = Intake(cfg.data_path, queue, cfg.priority_policy(), anonymize=False)
        studies = [intake.receive(p.read_bytes(), calling_ae="MODALITY").accepted.study_instance_uid for p in sources]
    log = tmp_path / "node.log"

    def start() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "cxr_serving", "dicom", "--config", str(config)],
                cwd=REPO,
                env=clean_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        _wait_serving(grpc_port, process, log)
        return process

    def statuses(stub: Any) -> list[pb.GetStudyStatusResponse]:
        return [
            stub.GetStudyStatus(pb.GetStudyStatusRequest(study_instance_uid=s), metadata=auth(), timeout=10)
            for s in studies
        ]

    process = start()
    try:
        second = DicomNode(settings, cfg)  # a second node on the same queue file while the first one lives
        with pytest.raises(QueueLockedError, match=f"pid {process.pid} "):
            asyncio.run(second.start())
        assert second.queue is None  # refused before it opened the queue file
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            stub = pb_grpc.DicomServiceStub(ch)
            deadline = time.monotonic() + WAIT_S
            while True:  # some studies done and an analysis in progress: kill it there
                answers = statuses(stub)
                if sum(a.done for a in answers) >= 2 and any(a.in_progress for a in answers):
                    process.send_signal(signal.SIGKILL)
                    break
                assert time.monotonic() < deadline, "the node made no progress"
                time.sleep(0.05)
        process.wait(30)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(30)
    with WorkQueue(cfg.data_path) as queue:
        killed = {i.sop_uid for s in studies for i in queue.study_items(s) if i.state == CLAIMED}
        leases = [r[0] for r in queue._db.execute("SELECT lease_until FROM items WHERE state = ?", (CLAIMED,))]
    assert killed, "no claim was left by the kill (the analysis finished in between): nothing tested"
    assert all(until - time.time() > LONG_LEASE_S - 120 for until in leases)  # the leases were far from expiry
    restarted = time.monotonic()
    process = start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            stub = pb_grpc.DicomServiceStub(ch)
            while True:
                answers = statuses(stub)
                if all(a.finished for a in answers):
                    break
                took = time.monotonic() - restarted
                assert took < RESTART_BOUND_S, f"not finished {took:.0f}s after the restart (lease {LONG_LEASE_S}s)"
                time.sleep(0.25)
        took = time.monotonic() - restarted
        assert all(a.done == 1 for a in answers), answers
        for answer in answers:
            [item] = answer.instances
            assert item.attempts == (2 if item.sop_instance_uid in killed else 1), (item, killed)
            stored = _orthanc_modalities(stack, answer.study_instance_uid)
            assert {m: len(v) for m, v in stored.items()} == {"SEG": 1, "SR": 1}, answer.study_instance_uid
        print(f"restart to every study finished: {took:.1f}s (lease {LONG_LEASE_S:.0f}s, bound {RESTART_BOUND_S:.0f}s)")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)
