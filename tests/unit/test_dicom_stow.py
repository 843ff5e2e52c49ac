"""The node's STOW-RS route (cxr_dicom.intakes.StowServer) on a real Intake, SQLite queue and files: PS3.18 answers
for partial storage, a full queue and a broken disk, the size limit while reading, and malformed bodies."""

from __future__ import annotations

import asyncio
import contextlib
import io
import sqlite3
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from starlette.testclient import TestClient

from cxr_dicom.config import DicomConfig
from cxr_dicom.intake import Intake, instance_path
from cxr_dicom.intakes import StowServer
from cxr_dicom.priority import PriorityPolicy
from cxr_dicom.work_queue import WorkQueue
from tests.support.paths import dicom_files

FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE = "00081198", "00081199"
OUT_OF_RESOURCES = 0xA700
CT = 'multipart/related; type="application/dicom"; boundary=b'


def server(tmp_path: Path, **dicom: Any) -> tuple[StowServer, WorkQueue]:
    cfg = DicomConfig.model_validate(
        {"data_path": str(tmp_path), "destinations": {"stow_url": "http://127.0.0.1:9/"}, **dicom}
    )
    queue = WorkQueue(tmp_path, max_pending=cfg.max_queue_size)
    return StowServer(cfg, Intake(tmp_path, queue, PriorityPolicy(), anonymize=False), None, "127.0.0.1"), queue


def new_instance(path: Path) -> tuple[pydicom.Dataset, bytes]:
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return ds, buf.getvalue()


def multipart(*parts: bytes) -> bytes:
    body = b"".join(b"--b\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts)
    return body + b"--b--\r\n"


def answer_of(r: Any) -> pydicom.Dataset:
    assert r.headers["content-type"].startswith("application/dicom+json"), r.headers
    return pydicom.Dataset.from_json(r.json())


def test_a_full_queue_after_a_stored_part_answers_202_with_the_rest_failed_0xa700(tmp_path):
    srv, queue = server(tmp_path, max_queue_size=1)
    (ds1, data1), (ds2, data2) = new_instance(dicom_files()[0]), new_instance(dicom_files()[1])
    r = TestClient(srv.app).post("/dicom-web/studies", content=multipart(data1, data2), headers={"Content-Type": CT})
    assert r.status_code == 202, r.text
    answer = answer_of(r)
    assert [str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence] == [ds1.SOPInstanceUID]
    assert [(int(i.FailureReason), str(i.ReferencedSOPInstanceUID)) for i in answer.FailedSOPSequence] == [
        (OUT_OF_RESOURCES, ds2.SOPInstanceUID)
    ]
    assert queue.get(ds1.SOPInstanceUID) is not None and queue.get(ds2.SOPInstanceUID) is None


def test_nothing_stored_because_the_queue_is_full_answers_503_with_the_configured_retry_after(tmp_path):
    srv, queue = server(tmp_path, max_queue_size=1, busy_retry_after_s=17)
    client = TestClient(srv.app)
    (_, data1), (ds2, data2) = new_instance(dicom_files()[0]), new_instance(dicom_files()[1])
    assert client.post("/dicom-web/studies", content=multipart(data1), headers={"Content-Type": CT}).status_code == 200
    r = client.post("/dicom-web/studies", content=multipart(data2), headers={"Content-Type": CT})
    assert r.status_code == 503 and r.headers["Retry-After"] == "17"
    assert queue.get(ds2.SOPInstanceUID) is None and not instance_path(tmp_path, ds2.SOPInstanceUID).exists()
    answer = answer_of(r)
    assert "ReferencedSOPSequence" not in answer
    assert [(int(i.FailureReason), str(i.ReferencedSOPInstanceUID)) for i in answer.FailedSOPSequence] == [
        (OUT_OF_RESOURCES, ds2.SOPInstanceUID)
    ]


def test_a_disk_that_cannot_keep_the_instance_is_0xa700_not_a_500(tmp_path):
    srv, queue = server(tmp_path, busy_retry_after_s=9)
    ds, data = new_instance(dicom_files()[0])
    instance_path(tmp_path, ds.SOPInstanceUID).parent.write_bytes(b"")  # instances/ is a file: mkdir fails
    r = TestClient(srv.app, raise_server_exceptions=False).post(
        "/dicom-web/studies", content=multipart(data), headers={"Content-Type": CT}
    )
    assert r.status_code == 503 and r.headers["Retry-After"] == "9", r.text
    assert [int(i.FailureReason) for i in answer_of(r).FailedSOPSequence] == [OUT_OF_RESOURCES]
    assert queue.get(ds.SOPInstanceUID) is None


def test_malformed_bodies_are_400_and_other_media_types_415(tmp_path):
    srv, _ = server(tmp_path)
    client = TestClient(srv.app)
    _, data = new_instance(dicom_files()[0])
    for body in (b"", b"--b--\r\n", b"garbage", multipart(data)[:-9]):
        r = client.post("/dicom-web/studies", content=body, headers={"Content-Type": CT})
        assert r.status_code == 400 and r.json()["error"], body[:20]
    r = client.post("/dicom-web/studies", content=multipart(data), headers={"Content-Type": "multipart/related"})
    assert r.status_code == 400 and "boundary" in r.json()["error"]
    r = client.post("/dicom-web/studies", content=b"{}", headers={"Content-Type": "application/json"})
    assert r.status_code == 415 and "multipart/related" in r.json()["error"]


def test_a_short_boundary_inside_a_dicom_part_is_stored_whole(tmp_path):
    srv, _ = server(tmp_path)
    ds, data = new_instance(dicom_files()[0])
    ds.PatientComments = "--b\n--b--"  # a part may hold the boundary anywhere but after a CRLF
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    assert b"--b" in data
    r = TestClient(srv.app).post("/dicom-web/studies", content=multipart(data), headers={"Content-Type": CT})
    assert r.status_code == 200, r.text
    assert instance_path(tmp_path, ds.SOPInstanceUID).read_bytes() == data


def test_every_shared_dicom_in_one_request_is_stored_byte_identical_and_the_spool_is_emptied(tmp_path):
    srv, _ = server(tmp_path)
    instances = [new_instance(p) for p in dicom_files()]
    assert len(instances) >= 6
    r = TestClient(srv.app).post(
        "/dicom-web/studies", content=multipart(*(d for _, d in instances)), headers={"Content-Type": CT}
    )
    assert r.status_code == 200, r.text
    assert len(answer_of(r).ReferencedSOPSequence) == len(instances)
    for ds, data in instances:
        assert instance_path(tmp_path, ds.SOPInstanceUID).read_bytes() == data
    assert [p for p in (tmp_path / "stow-spool").rglob("*")] == []


async def asgi_post(app: Any, headers: list[tuple[bytes, bytes]], chunks: int, size: int) -> tuple[int, int]:
    """(status, body bytes the app pulled) for a POST whose body is ``chunks`` messages of ``size`` bytes."""
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if pulled >= chunks * size:
            return {"type": "http.disconnect"}
        pulled += size
        return {"type": "http.request", "body": b"\0" * size, "more_body": pulled < chunks * size}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/dicom-web/studies",
        "raw_path": b"/dicom-web/studies",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    return sent[0]["status"], pulled


def test_the_size_limit_stops_reading_a_declared_or_chunked_body_early(tmp_path):
    srv, _ = server(tmp_path, stow_max_request_mb=1)
    mib = 1024 * 1024
    ct = (b"content-type", CT.encode())
    status, pulled = asyncio.run(asgi_post(srv.app, [ct, (b"content-length", str(64 * mib).encode())], 64, mib))
    assert (status, pulled) == (413, 0)  # a declared length over the limit: not one byte read
    status, pulled = asyncio.run(asgi_post(srv.app, [ct, (b"transfer-encoding", b"chunked")], 1024, 64 * 1024))
    assert status == 413 and mib < pulled <= mib + 64 * 1024  # chunked: stopped at the first chunk past 1 MiB
    assert [p for p in (tmp_path / "stow-spool").rglob("*")] == []


def test_a_sender_of_a_chunked_body_over_the_limit_sees_413_long_before_it_finished(tmp_path):
    """Through uvicorn on a real socket: the answer comes while the sender still has most of the body to send."""
    srv, _ = server(tmp_path, stow_port=0, stow_max_request_mb=1)
    total, chunk = 64 * 1024 * 1024, 64 * 1024

    async def run() -> tuple[bytes, int]:
        await srv.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            head = f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {CT}\r\n"
            head += "Transfer-Encoding: chunked\r\n\r\n"
            writer.write(head.encode())
            sent = 0
            answer = b""
            try:
                deadline = time.monotonic() + 60
                while sent < total and not answer and time.monotonic() < deadline:
                    writer.write(f"{chunk:x}\r\n".encode() + b"\0" * chunk + b"\r\n")
                    await asyncio.wait_for(writer.drain(), 10)
                    sent += chunk
                    with contextlib.suppress(TimeoutError):
                        answer = await asyncio.wait_for(reader.read(4096), 0.001)
            except (ConnectionError, TimeoutError):
                pass  # the node closed the connection after answering
            if not answer:
                answer = await asyncio.wait_for(reader.read(4096), 10)
            writer.close()
            return answer, sent
        finally:
            await srv.stop()

    answer, sent = asyncio.run(asyncio.wait_for(run(), 120))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert sent <= total // 4, sent  # kernel socket buffers aside, the node read about 1 MiB


def test_a_data_path_that_cannot_spool_the_request_answers_503_not_a_500(tmp_path):
    srv, _ = server(tmp_path, busy_retry_after_s=11)
    (tmp_path / "stow-spool").write_bytes(b"")  # the spool folder is a file: nothing can be written there
    _, data = new_instance(dicom_files()[0])
    r = TestClient(srv.app, raise_server_exceptions=False).post(
        "/dicom-web/studies", content=multipart(data), headers={"Content-Type": CT}
    )
    assert r.status_code == 503 and r.headers["Retry-After"] == "11", r.text
    assert r.headers["content-type"].startswith("application/dicom+json")


def test_a_queue_database_error_is_0xa700_not_a_500(tmp_path):
    srv, queue = server(tmp_path, busy_retry_after_s=13)
    with sqlite3.connect(queue.path) as db:
        db.execute("DROP TABLE items")  # a real sqlite3.OperationalError on the next queue access
    _, data = new_instance(dicom_files()[0])
    r = TestClient(srv.app, raise_server_exceptions=False).post(
        "/dicom-web/studies", content=multipart(data), headers={"Content-Type": CT}
    )
    assert r.status_code == 503 and r.headers["Retry-After"] == "13", r.text
    assert [int(i.FailureReason) for i in answer_of(r).FailedSOPSequence] == [OUT_OF_RESOURCES]


def _audit_events(caplog: Any) -> list[dict[str, Any]]:
    return [r.fields["auditEvent"] for r in caplog.records if r.name == "cxr.audit"]


def _sender_address(event: dict[str, Any]) -> str:
    [source] = [a for a in event["agent"] if a["requestor"]]
    return str(source["network"]["address"])


def test_the_stow_audit_names_the_client_behind_a_trusted_gateway_and_otherwise_the_peer(tmp_path, caplog):
    """``security.trusted_proxies`` 10.0.0.0/8: a request from the gateway at 10.0.0.2 is audited as the client
    X-Forwarded-For names (from the right, past the trusted 10.0.0.9); the same header from an untrusted peer is
    a claim, and its peer is audited."""
    from cxr_dicom.audit_events import validate

    caplog.set_level("INFO", logger="cxr.audit")
    srv, _ = server(tmp_path)
    srv.trusted_proxies = ["10.0.0.0/8"]
    headers = {"Content-Type": CT, "X-Forwarded-For": "203.0.113.7, 10.0.0.9"}
    for peer in ("10.0.0.2", "192.0.2.5"):
        client = TestClient(srv.app, client=(peer, 5000))
        _, data = new_instance(dicom_files()[0])
        assert client.post("/dicom-web/studies", content=multipart(data), headers=headers).status_code == 200
    events = _audit_events(caplog)
    assert [_sender_address(e) for e in events] == ["203.0.113.7", "192.0.2.5"]
    assert all(e["outcome"] == "0" and validate(e) for e in events)


def test_refused_instances_are_audited_with_their_status_and_study(tmp_path, caplog):
    """A CT image and a part that is not DICOM, refused by STOW-RS (409), each get an import AuditEvent with
    outcome 4 (minor failure), the FailureReason and the refusal kind; the CT's names its study."""
    from pydicom.data import get_testdata_file

    from cxr_dicom.audit_events import validate

    caplog.set_level("INFO", logger="cxr.audit")
    srv, _ = server(tmp_path)
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    body = multipart(ct)[: -len(b"--b--\r\n")] + b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b--\r\n"
    r = TestClient(srv.app, client=("192.0.2.5", 5000)).post(
        "/dicom-web/studies", content=body, headers={"Content-Type": CT}
    )
    assert r.status_code == 409, r.text
    events = _audit_events(caplog)
    assert [(e["outcome"], e["outcomeDesc"]) for e in events] == [
        ("4", "0x0122 SOP_CLASS_NOT_SUPPORTED"),
        ("4", "0xC000 CANNOT_UNDERSTAND"),
    ]
    ct_study = pydicom.dcmread(io.BytesIO(ct), stop_before_pixels=True).StudyInstanceUID
    assert events[0]["entity"][0]["what"]["identifier"]["value"] == f"urn:oid:{ct_study}"
    assert "what" not in events[1]["entity"][0]
    assert all(_sender_address(e) == "192.0.2.5" and validate(e) for e in events)
