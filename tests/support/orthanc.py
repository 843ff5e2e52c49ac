"""A real Orthanc PACS for tests: a plain child process with a generated config, ephemeral ports, storage in tmp.

The process, its config and its ports are scripts/orthanc.py's (`make orthanc` runs the same for a person).
Debian's ``orthanc`` and ``orthanc-dicomweb`` packages (``make dicom-tools`` installs them with apt when we
are root, as in CI). Without them the tests skip only when we are not root (we could not install them);
as root a missing Orthanc fails the test, so CI never skips silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.scripts import load_script

_script = load_script("orthanc")
Orthanc = _script.Orthanc
AE_TITLE: str = _script.AE_TITLE
free_port = _script.free_port


def require(*binaries: str) -> None:
    """Skip (not root: cannot install) or fail (root, as in CI: `make dicom-tools` should have) when missing."""
    missing = _script.missing(*binaries)
    if not missing:
        return
    message = f"{', '.join(missing)} not installed (apt-get install orthanc orthanc-dicomweb dcmtk; `make dicom-tools`)"
    if os.geteuid() != 0:
        pytest.skip(message + ": not root, so the test cannot install them")
    pytest.fail(message + ": running as root, so `make dicom-tools` should have installed them")


@contextmanager
def run_orthanc(root: Path, ports: tuple[int, int] | None = None) -> Iterator[Orthanc]:
    """Start Orthanc under ``root`` (config, storage, log) on free ports, wait until it serves REST and DICOMweb,
    stop it. ``ports`` (HTTP, DICOM): chosen in advance, for a test whose client points at Orthanc before it starts."""
    require()
    http_port, dicom_port = ports or (None, None)
    with _script.run_orthanc(root, http_port, dicom_port) as orthanc:
        yield orthanc
