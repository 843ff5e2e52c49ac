"""The node's result senders keep one HTTP client: STOW-RS and FHIR requests reuse its connections (a real
HTTP/1.1 server on 127.0.0.1 records the client port of every request)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom
import pytest

from cxr_dicom.config import DestinationsConfig
from cxr_dicom.fhir import build_bundle
from cxr_dicom.results import Algorithm, AlgorithmResult, Finding
from cxr_dicom.sr import build_sr
from cxr_dicom.worker import ResultObject, Senders
from tests.support.paths import DICOM_DIR

RESULTS = [AlgorithmResult(Algorithm("densenet121-res224-nih", "1", "ab" * 32), (Finding("Mass", 0.7, 0.5, True),))]
SENDS = 3


class KeepAliveServer(ThreadingHTTPServer):
    """Answers every POST with 200 on a persistent HTTP/1.1 connection; ``peers`` is (path, client port) each."""

    daemon_threads = True

    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                server.peers.append((self.path, self.client_address[1]))
                payload = b"" if self.path.endswith("/studies") else json.dumps({"resourceType": "Bundle"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def server() -> Iterator[KeepAliveServer]:
    s = KeepAliveServer()
    threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        yield s
    finally:
        s.shutdown()
        s.server_close()


def test_senders_send_every_stow_and_fhir_request_on_one_kept_connection(server, tmp_path):
    source = pydicom.dcmread(DICOM_DIR / "nih-dx-mono2-8bit.dcm", stop_before_pixels=True)
    kept = [ResultObject.of(build_sr(source, RESULTS))]
    bundle = build_bundle(source, RESULTS)
    url = f"http://127.0.0.1:{server.server_port}"
    senders = Senders(DestinationsConfig.model_validate({"stow_url": url, "fhir_url": f"{url}/fhir"}), "CXRNODE")
    for _ in range(SENDS):
        senders.send(kept, bundle)
    assert [path for path, _ in server.peers] == ["/studies", "/fhir/"] * SENDS
    assert len({port for _, port in server.peers}) == 1, server.peers  # one connection, kept between sends
    client = senders.http
    senders.close()
    assert client.is_closed and senders.http is not client  # close() ends it; a later send makes a new one
    senders.close()
