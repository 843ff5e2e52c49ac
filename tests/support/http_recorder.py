"""A real HTTP server on 127.0.0.1 that records what the DICOM node POSTs (STOW-RS, FHIR)."""

from __future__ import annotations

import contextlib
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom

from cxr_dicom.intakes import parse_multipart_related

HOLD_S = 120.0


class Recorder:
    """A real HTTP server that records every POST (path, headers, body) and answers 200 with a FHIR
    transaction-response to /fhir and ``stow_answer`` (by default 200, empty) to STOW-RS; while ``hold`` is
    clear a STOW-RS request is recorded at once and answered only once it is set (at most HOLD_S later)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.stow_answer: tuple[int, bytes] = (200, b"")  # (HTTP status, DICOM JSON body) of every STOW-RS
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                recorder.requests.append((self.path, dict(self.headers), body))
                if self.path.endswith("/studies"):
                    recorder.hold.wait(HOLD_S)
                status, payload, content_type = 200, b"", "application/fhir+json"
                if self.path.startswith("/fhir"):
                    payload = json.dumps({"resourceType": "Bundle", "type": "transaction-response"}).encode()
                elif self.path.endswith("/studies"):
                    (status, payload), content_type = recorder.stow_answer, "application/dicom+json"
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def stow_bodies(self) -> list[tuple[str, bytes]]:
        """(Content-Type, body) of every STOW-RS POST, in arrival order."""
        return [(h.get("Content-Type", ""), body) for path, h, body in self.requests if path.endswith("/studies")]

    def stow_parts(self, index: int) -> list[bytes]:
        """The multipart/related parts of the ``index``-th STOW-RS request, read by the node's own parser."""
        content_type, body = self.stow_bodies()[index]
        return [data for _, data in parse_multipart_related(body, content_type)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def recording_server() -> Iterator[Recorder]:
    r = Recorder()
    try:
        yield r
    finally:
        r.close()


def multipart_datasets(content_type: str, body: bytes) -> list[pydicom.Dataset]:
    """The DICOM parts of a multipart/related STOW-RS body, read by the node's own RFC 2046 parser."""
    return [pydicom.dcmread(io.BytesIO(data)) for _, data in parse_multipart_related(body, content_type)]
