"""Measured numbers of the reliability tests: printed, and written as JSON to
$CXR_RELIABILITY_RESULTS/<name>.json when that variable is set (bench/results/reliability/)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def report(name: str, data: dict[str, Any]) -> None:
    payload = {
        "test": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        **data,
    }
    text = json.dumps(payload, indent=2, default=str)
    print(f"\n[{name}] {text}")
    out = os.environ.get("CXR_RELIABILITY_RESULTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(text + "\n")
