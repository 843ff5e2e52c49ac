"""A real Orthanc PACS for tests: a plain child process with a generated config, ephemeral ports, storage in tmp.

Debian's ``orthanc`` and ``orthanc-dicomweb`` packages (``make dicom-tools`` installs them with apt when we
are root, as in CI). Without them the tests skip only when we are not root (we could not install them);
as root a missing Orthanc fails the test, so CI never skips silently.

Orthanc 1.10 has no listen-address option: it binds its ports on every interface. ``RemoteAccessAllowed``
false limits HTTP to localhost, and the tests only ever connect to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
AE_TITLE = "ORTHANC"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
START_ATTEMPTS = 3  # a free port taken by someone else between probing and Orthanc binding it


def require(*binaries: str) -> None:
    """Skip (not root: cannot install) or fail (root, as in CI: `make dicom-tools` should have) when missing."""
    missing = [b for b in (ORTHANC, DICOMWEB_PLUGIN, *binaries) if not (Path(b).exists() or shutil.which(b))]
    if not missing:
        return
    message = f"{', '.join(missing)} not installed (apt-get install orthanc orthanc-dicomweb dcmtk; `make dicom-tools`)"
    if os.geteuid() != 0:
        pytest.skip(message + ": not root, so the test cannot install them")
    pytest.fail(message + ": running as root, so `make dicom-tools` should have installed them")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    """A running Orthanc: its ports, AE title and REST base URL."""

    process: subprocess.Popen[bytes]
    http_port: int
    dicom_port: int
    ae_title: str
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def get(self, path: str) -> Any:
        response = httpx.get(self.url + path, timeout=30)
        response.raise_for_status()
        return response.json()

    def instance_uids(self) -> set[str]:
        """SOP Instance UIDs of every instance Orthanc stores."""
        uids = set()
        for orthanc_id in self.get("/instances"):
            uids.add(self.get(f"/instances/{orthanc_id}/simplified-tags")["SOPInstanceUID"])
        return uids

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def _config(root: Path, http_port: int, dicom_port: int) -> dict[str, Any]:
    return {
        "Name": "cxr-test-pacs",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": AE_TITLE,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpDescribeErrors": True,
        "StorageCompression": False,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
    }


def _wait_ready(orthanc: Orthanc, deadline: float) -> bool:
    """True once REST and the DICOMweb plugin answer; False when the process died (a port taken) or time ran out."""
    for _ in range(int(START_TIMEOUT_S / 0.1) + 1):
        if orthanc.process.poll() is not None or time.monotonic() > deadline:
            return False
        try:
            system = httpx.get(orthanc.url + "/system", timeout=2)
            studies = httpx.get(orthanc.dicomweb_url + "/studies", timeout=2)
            if system.status_code == 200 and studies.status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)


@contextmanager
def run_orthanc(root: Path, ports: tuple[int, int] | None = None) -> Iterator[Orthanc]:
    """Start Orthanc under ``root`` (config, storage, log), wait until it serves REST and DICOMweb, stop it.

    ``ports`` (HTTP, DICOM): chosen in advance, for a test whose client points at Orthanc before it starts."""
    require()
    root.mkdir(parents=True, exist_ok=True)
    last_log = ""
    for attempt in range(START_ATTEMPTS):
        http_port, dicom_port = ports or (free_port(), free_port())
        config = root / f"orthanc-{attempt}.json"
        config.write_text(json.dumps(_config(root, http_port, dicom_port), indent=1))
        log_path = root / f"orthanc-{attempt}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen([ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=root)
        orthanc = Orthanc(process, http_port, dicom_port, AE_TITLE, log_path)
        try:
            if _wait_ready(orthanc, time.monotonic() + START_TIMEOUT_S):
                yield orthanc
                return
            last_log = orthanc.log()
        finally:
            _stop(process)
    raise RuntimeError(f"Orthanc did not start in {START_ATTEMPTS} attempts; last log:\n{last_log}")
