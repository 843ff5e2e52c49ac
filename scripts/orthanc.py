"""`make orthanc`: a real Orthanc PACS on loopback for the DICOM node, with a generated config and DICOMweb.

The tests (tests/support/orthanc.py) and bench/dicom_node.py start it through `run_orthanc` on free ports;
`make orthanc` runs it in the foreground on the ports config/local.json sends results to (HTTP 8042, DICOM
4242), prints its URLs and stops it on Ctrl-C. Debian's ``orthanc`` and ``orthanc-dicomweb`` packages
provide it (`make dicom-tools`).

Orthanc 1.10 has no listen-address option: it binds its ports on every interface. ``RemoteAccessAllowed``
false limits HTTP to localhost.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
AE_TITLE = "ORTHANC"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
START_ATTEMPTS = 3  # a free port taken by someone else between probing and Orthanc binding it
ROOT = Path(__file__).resolve().parent.parent


def missing(*binaries: str) -> list[str]:
    """Orthanc, its DICOMweb plugin and `binaries` that are not installed."""
    return [b for b in (ORTHANC, DICOMWEB_PLUGIN, *binaries) if not (Path(b).exists() or shutil.which(b))]


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


def orthanc_config(root: Path, http_port: int, dicom_port: int) -> dict[str, Any]:
    """Storage under ``root``, REST and DICOM on these ports, DICOMweb at /dicom-web, any sender may store."""
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
def run_orthanc(root: Path, http_port: int | None = None, dicom_port: int | None = None) -> Iterator[Orthanc]:
    """Start Orthanc under ``root`` (config, storage, log), wait until it serves REST and DICOMweb, stop it.

    Ports left None are free ones, probed again on each attempt; fixed ports get one attempt."""
    if missing():
        raise RuntimeError(f"{', '.join(missing())} not installed (make dicom-tools)")
    root.mkdir(parents=True, exist_ok=True)
    last_log = ""
    attempts = START_ATTEMPTS if http_port is None or dicom_port is None else 1
    for attempt in range(attempts):
        http, dicom = http_port or free_port(), dicom_port or free_port()
        config = root / f"orthanc-{attempt}.json"
        config.write_text(json.dumps(orthanc_config(root, http, dicom), indent=1))
        log_path = root / f"orthanc-{attempt}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen([ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=root)
        orthanc = Orthanc(process, http, dicom, AE_TITLE, log_path)
        try:
            if _wait_ready(orthanc, time.monotonic() + START_TIMEOUT_S):
                yield orthanc
                return
            last_log = orthanc.log()
        finally:
            _stop(process)
    raise RuntimeError(f"Orthanc did not start in {attempts} attempt(s); last log:\n{last_log}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--http-port", type=int, default=8042, help="REST, web UI and DICOMweb (config/local.json: 8042)")
    ap.add_argument("--dicom-port", type=int, default=4242, help="DIMSE (C-STORE, C-FIND) port")
    ap.add_argument("--storage", type=Path, default=ROOT / "var" / "orthanc", help="config, database and log")
    args = ap.parse_args(argv)
    if missing():
        print(f"orthanc: {', '.join(missing())} not installed: make dicom-tools (as root) or", file=sys.stderr)
        print("  sudo apt-get install -y orthanc orthanc-dicomweb dcmtk", file=sys.stderr)
        return 2
    stop = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        with run_orthanc(args.storage, args.http_port, args.dicom_port) as orthanc:
            print(f"Orthanc {AE_TITLE}: DICOM 127.0.0.1:{orthanc.dicom_port}, storage {args.storage}", flush=True)
            print(f"  web UI    {orthanc.url}/app/explorer.html", flush=True)
            print(f"  REST      {orthanc.url}/instances", flush=True)
            print(f"  DICOMweb  {orthanc.dicomweb_url}", flush=True)
            print("Ctrl-C stops it", flush=True)
            while not stop and orthanc.process.poll() is None:
                time.sleep(0.2)
            if orthanc.process.poll() is not None:
                print(f"Orthanc exited with {orthanc.process.returncode}:\n{orthanc.log()}", file=sys.stderr)
                return 1
    except RuntimeError as exc:
        print(f"orthanc: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
