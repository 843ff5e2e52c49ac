"""The README's "DICOM node quickstart", step by step: `make orthanc` (scripts/orthanc.py), `make run`
(scripts/run_local.py with config/local.json, only the ports, storage paths and model input sizes changed),
`storescu` of a shared radiograph to the node, and the SR found through Orthanc's REST API."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.support.orthanc import free_port, require
from tests.support.paths import DICOM_DIR, REPO

START_S = 420.0
RESULT_S = 300.0
SAMPLE = DICOM_DIR / "nih-dx-mono2-8bit.dcm"  # the file the README sends


class Process:
    """A command in its own process group whose output lines are read with a bounded wait."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.out = log.open("wb")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, line: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if line in text:
                return text
            assert self.proc.poll() is None, f"exited with {self.proc.returncode} before {line!r}:\n{text[-4000:]}"
            time.sleep(0.5)
        raise AssertionError(f"no {line!r} after {timeout:.0f} s:\n{self.text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C, as the README says
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.out.close()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    try:
        yield started
    finally:
        for p in reversed(started):
            p.stop()


def local_config(tmp: Path, orthanc_http: int) -> tuple[Path, dict[str, int]]:
    """config/local.json with free ports, storage under tmp and 64 px models; everything else as it is."""
    cfg = json.loads((REPO / "config" / "local.json").read_text())
    ports = {name: free_port() for name in ("classification", "segmentation", "dicom", "dimse", "stow")}
    for name in ("classification", "segmentation", "dicom"):
        cfg["services"][name] = {"host": "127.0.0.1", "port": ports[name], "metrics_port": free_port()}
    for name in ("binary_classifier", "multiclass_classifier", "segmentation"):
        cfg["models"][name]["input_size"] = 64
    node = cfg["models"]["dicom"]
    assert node["destinations"]["stow_url"] == "http://127.0.0.1:8042/dicom-web"  # what `make orthanc` serves
    node["destinations"]["stow_url"] = f"http://127.0.0.1:{orthanc_http}/dicom-web"
    node["destinations"]["fhir_folder"] = str(tmp / "fhir")
    node.update(dimse_port=ports["dimse"], stow_port=ports["stow"], data_path=str(tmp / "node"))
    cfg["models_path"] = str(tmp / "models")
    path = tmp / "local.json"
    path.write_text(json.dumps(cfg))
    return path, ports


@pytest.mark.slow
@pytest.mark.timeout(START_S + RESULT_S + 180)
def test_readme_dicom_node_quickstart(tmp_path, processes):
    require("storescu")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}  # a newcomer's shell
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update({f"CXR_GATEWAY_{p}_PORT": str(free_port()) for p in ("REST", "GRPC", "STATUS")})
    http, dicom = free_port(), free_port()
    orthanc = Process(
        [sys.executable, "scripts/orthanc.py", "--http-port", str(http), "--dicom-port", str(dicom),
         "--storage", str(tmp_path / "orthanc")],
        env, tmp_path / "orthanc.out",
    )  # fmt: skip
    processes.append(orthanc)
    printed = orthanc.wait_for("Ctrl-C stops it", 90)
    ui = f"http://127.0.0.1:{http}/app/explorer.html"
    assert ui in printed and f"http://127.0.0.1:{http}/dicom-web" in printed
    assert httpx.get(ui, timeout=10).status_code == 200

    config, ports = local_config(tmp_path, http)
    # the node reaches the services as cxr_client does: on make run's ports, here the ones of this config
    env.update(CXR_CLASSIFICATION_ENDPOINT=f"127.0.0.1:{ports['classification']}")
    env.update(CXR_SEGMENTATION_ENDPOINT=f"127.0.0.1:{ports['segmentation']}")
    run = Process(
        [sys.executable, "scripts/run_local.py", "--config", str(config), "--only", "classification", "segmentation",
         "dicom"],
        env, tmp_path / "run.out",
    )  # fmt: skip
    processes.append(run)
    run.wait_for("all started", START_S)

    store = subprocess.run(
        ["storescu", "-aec", "CXR", "127.0.0.1", str(ports["dimse"]), str(SAMPLE)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert store.returncode == 0 and "Store Failed" not in store.stderr, store.stderr

    source = pydicom.dcmread(SAMPLE, stop_before_pixels=True)
    query = {"Level": "Series", "Query": {"Modality": "SR"}, "Expand": True}
    deadline = time.monotonic() + RESULT_S
    found: list[dict] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{http}", timeout=10) as rest:
        while not found and time.monotonic() < deadline:
            found = rest.post("/tools/find", json=query).json()
            time.sleep(0.5)
    assert found, f"no SR in Orthanc after {RESULT_S:.0f} s; the node's log:\n{run.text()[-4000:]}"
    [series] = found
    sr_file = httpx.get(f"http://127.0.0.1:{http}/instances/{series['Instances'][0]}/file", timeout=30).content
    sr = pydicom.dcmread(io.BytesIO(sr_file))
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
