"""`make bench`: run every benchmark module (bench/*.py and bench/gpu/*.py that are not helpers), one process each,
as `python -m bench.<name>` from the repository root; bench/plot.py last."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {"run_all", "__init__", "plot", "rag_corpus"}  # rag_corpus writes data for rag_scale; it measures nothing


def modules() -> list[str]:
    """Dotted names of the benchmarks: modules whose names start with "_" are helpers, not benchmarks."""
    found = [*HERE.glob("*.py"), *HERE.glob("gpu/*.py")]
    names = [p.relative_to(HERE.parent).with_suffix("") for p in found if p.stem not in SKIP]
    return sorted(".".join(n.parts) for n in names if not n.name.startswith("_"))


def main() -> int:
    benches = modules()
    if not benches:
        print("no benchmarks yet")
        return 0
    failed = []
    for module in [*benches, "bench.plot"]:
        print(f"== {module}", flush=True)
        if subprocess.call([sys.executable, "-m", module], cwd=HERE.parent) != 0:
            failed.append(module)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
