"""Wheels for a bare GPU machine that has CUDA torch but not our other dependencies (bench/gpu/gpu_session.sh).

Walks the requirements of our packages, LitServe and py-spy (the probe) as installed in this virtualenv, skips what the
target already has (`--present`: a file of package names, one per line or space-separated; torch,
torchvision and NVIDIA's packages, with their own requirements, are always skipped: they must match the
machine's CUDA), and downloads the rest for the target's Python into .whl/. `--force` downloads some anyway (packages
whose version must match ours: grpcio and protobuf for the generated code, timm for the models).
Then copies a few NIH PNGs into .gpudata/ for the benchmarks.

    .venv/bin/python -m bench.gpu._gpu_wheels --present target-packages.txt --python-version 3.12
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
from pathlib import Path

from bench._common import IMAGES, REPO

ROOTS = ["cxr-serving", "cxr-classification", "cxr-segmentation", "cxr-gateway", "cxr-protos", "litserve", "py-spy"]
ALWAYS_PRESENT = {"torch", "torchvision", "triton", "numpy", "pillow"}
GPU_IMAGES = 16  # NIH PNGs shipped to the GPU machine: gpu_paths holds all of them back for the runtime check
PLATFORMS = ["manylinux2014_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(name: str) -> list[str]:
    """The installed distribution's unconditional requirements (none when it is not installed)."""
    from packaging.requirements import Requirement

    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return []
    reqs = (Requirement(raw) for raw in dist.requires or [])
    return [r.name for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def _with_requirements(names: set[str]) -> set[str]:
    """`names` and everything they require: a machine with CUDA torch has torch's own requirements too."""
    out: set[str] = set()
    todo = [norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo.extend(norm(r) for r in _requirements(name))
    return out


def needed(present: set[str], force: set[str]) -> list[str]:
    """name==version of every installed requirement of ROOTS the target lacks (or that is forced)."""
    present = present | _with_requirements(ALWAYS_PRESENT)
    seen: dict[str, str | None] = {}
    todo = list(ROOTS)
    while todo:
        name = norm(todo.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            seen[name] = None
            continue
        seen[name] = dist.version
        if name in present and name not in force:
            continue
        todo.extend(_requirements(name))
    return sorted(
        f"{n}=={v}"
        for n, v in seen.items()
        if v and not n.startswith(("cxr-", "nvidia-", "cuda-")) and (n not in present or n in force)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--present", type=Path, help="file naming the packages the target already has")
    ap.add_argument("--force", default="grpcio,protobuf,timm", help="download these even if present")
    ap.add_argument("--python-version", default="3.12")
    ap.add_argument("--images", type=int, default=GPU_IMAGES, help="NIH PNGs to copy into .gpudata/")
    ap.add_argument("--dry-run", action="store_true", help="print the list, download nothing")
    args = ap.parse_args(argv)
    present = {norm(n) for n in args.present.read_text().split()} if args.present else set()
    wanted = needed(present, {norm(n) for n in args.force.split(",") if n})
    print("\n".join(wanted))
    if args.dry_run:
        return 0
    dest = REPO / ".whl"
    dest.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           args.python_version, "--implementation", "cp", "-d", str(dest)]  # fmt: skip
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run([*cmd, *wanted], check=True)
    images = REPO / ".gpudata" / "data" / "cxr14-sample" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for png in sorted(IMAGES.glob("*.png"))[: args.images]:
        shutil.copy2(png, images / png.name)
    licence = IMAGES.parent / "README.md"
    if licence.exists():
        shutil.copy2(licence, images.parent / "README.md")
    size = sum(f.stat().st_size for f in dest.iterdir()) / 2**20
    print(f"{len(wanted)} wheels in .whl/ ({size:.0f} MiB), {args.images} PNGs in .gpudata/; "
          "add both to .git/info/exclude and carry them")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
