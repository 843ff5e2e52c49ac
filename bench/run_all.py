"""`make bench`: run every bench/*.py that defines main(), in one process each; bench/plot.py last."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    skip = {"run_all.py", "__init__.py", "plot.py"}
    scripts = sorted(p for p in HERE.glob("*.py") if p.name not in skip and not p.name.startswith("_"))
    if not scripts:
        print("no benchmarks yet")
        return 0
    failed = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        if subprocess.call([sys.executable, str(script)], cwd=HERE.parent) != 0:
            failed.append(script.name)
    print("== plot.py", flush=True)
    if subprocess.call([sys.executable, str(HERE / "plot.py")], cwd=HERE.parent) != 0:
        failed.append("plot.py")
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
