"""cxr_dicom.fhir.post_bundle against a real HTTP server on 127.0.0.1 that records what it receives."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom
import pytest

from cxr_dicom.fhir import FhirPostError, build_bundle, post_bundle, validate_bundle
from cxr_dicom.results import Algorithm, AlgorithmResult, Finding
from tests.support.paths import DICOM_DIR

RESULTS = (AlgorithmResult(Algorithm("densenet121-res224-nih", "1", "ab" * 32), (Finding("Mass", 0.7, 0.5, True),)),)


class Recorder:
    def __init__(self, status: int) -> None:
        self.status = status
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []


def serve(recorder: Recorder) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            recorder.requests.append(("POST", self.path, dict(self.headers), body))
            bundle = json.loads(body)
            answer = {
                "resourceType": "Bundle",
                "type": "transaction-response",
                "entry": [{"response": {"status": "201 Created"}} for _ in bundle.get("entry", [])],
            }
            payload = json.dumps(answer if recorder.status < 400 else {"resourceType": "OperationOutcome"}).encode()
            self.send_response(recorder.status)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def source():
    return pydicom.dcmread(DICOM_DIR / "nih-dx-mono2-8bit.dcm", stop_before_pixels=True)


def test_post_bundle_delivers_the_validated_bundle(source):
    recorder = Recorder(200)
    server = serve(recorder)
    try:
        bundle = build_bundle(source, RESULTS)
        answer = post_bundle(
            bundle, f"http://127.0.0.1:{server.server_port}/fhir", headers={"Authorization": "Bearer t"}, timeout_s=10
        )
    finally:
        server.shutdown()
        server.server_close()
    assert answer["type"] == "transaction-response" and len(answer["entry"]) == len(bundle["entry"])
    [(method, path, headers, body)] = recorder.requests
    assert (method, path) == ("POST", "/fhir/")
    assert headers["Content-Type"] == "application/fhir+json" and headers["Authorization"] == "Bearer t"
    received = json.loads(body)
    assert received == bundle
    validate_bundle(received)


def test_post_bundle_raises_on_a_refusal(source):
    recorder = Recorder(422)
    server = serve(recorder)
    try:
        with pytest.raises(FhirPostError) as info:
            post_bundle(build_bundle(source, RESULTS), f"http://127.0.0.1:{server.server_port}", timeout_s=10)
    finally:
        server.shutdown()
        server.server_close()
    assert info.value.status == 422 and "OperationOutcome" in info.value.body
    assert len(recorder.requests) == 1
