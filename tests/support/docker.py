"""Reading deploy/docker: Dockerfile instructions and the images' HEALTHCHECK code, for the deploy tests."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.chart import ROOT

DOCKER = ROOT / "deploy" / "docker"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def healthcheck_code(cmd: str) -> str:
    """The Python code of a HEALTHCHECK's `CMD ["python", "-c", code]`."""
    exec_form = json.loads(cmd[cmd.index("CMD") + 3 :].strip())
    assert exec_form[:2] == ["python", "-c"]
    return exec_form[2]
