"""A STOW-RS endpoint that records every request body and answers 200 with no content (all stored), so a test
sees the exact bytes a client sent."""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


class StowRecorder:
    """``url`` is the DICOMweb base URL; ``bodies`` holds (Content-Type, body) per POST, in arrival order."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, bytes]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                recorder.bodies.append((self.headers.get("Content-Type", ""), self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/dicom-web"

    def __enter__(self) -> StowRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def parts(self, index: int) -> list[bytes]:
        """The multipart/related parts (bodies without their headers) of the ``index``-th request."""
        content_type, body = self.bodies[index]
        found = re.search(r'boundary="?([^";]+)"?', content_type)
        assert found, content_type
        delimiter = b"--" + found.group(1).encode()
        out = []
        for chunk in body.split(delimiter)[1:]:
            if chunk.startswith(b"--"):
                break
            _, _, rest = chunk.partition(b"\r\n\r\n")
            out.append(rest[:-2] if rest.endswith(b"\r\n") else rest)
        return out
