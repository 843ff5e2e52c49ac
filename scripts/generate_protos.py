"""Generate the Python stubs (package cxr_protos) and the gateway descriptor set.

    python scripts/generate_protos.py          # write libs/protos/src/cxr_protos and gateway/protos.pb
    python scripts/generate_protos.py --check  # exit 1 if the committed output is stale

protoc names modules after the proto path (`cxr.common.v1`); we rewrite those imports to
`cxr_protos.common.v1` so the stubs install as one package beside googleapis-common-protos.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_PKG = ROOT / "libs" / "protos" / "src" / "cxr_protos"
DESCRIPTOR = ROOT / "gateway" / "protos.pb"
WKT_INCLUDE = Path(grpc_tools.__file__).parent / "_proto"
IMPORT_RE = re.compile(r"^(from|import) cxr\.", re.MULTILINE)

HEADER = '"""Generated gRPC stubs of the cxr API. Do not edit: run `make generate`."""\n'


def _protoc(args: list[str]) -> None:
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{WKT_INCLUDE}", *args])
    if rc != 0:
        sys.exit(f"protoc failed ({rc}) for: {' '.join(args)}")


def generate(dest_pkg: Path, dest_descriptor: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "cxr").rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _protoc([f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos])
        if dest_pkg.exists():
            shutil.rmtree(dest_pkg)
        src = out / "cxr"
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            target = dest_pkg / rel
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            text = IMPORT_RE.sub(lambda m: f"{m.group(1)} cxr_protos.", path.read_text())
            target.write_text(text)
        for d in [dest_pkg, *[p for p in dest_pkg.rglob("*") if p.is_dir()]]:
            (d / "__init__.py").write_text(HEADER if d == dest_pkg else "")
        (dest_pkg / "py.typed").write_text("")
    dest_descriptor.parent.mkdir(parents=True, exist_ok=True)
    _protoc([f"--descriptor_set_out={dest_descriptor}", "--include_imports", "--include_source_info", *protos])


def _same_tree(a: Path, b: Path) -> list[str]:
    diffs: list[str] = []
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    files_b = (
        {p.relative_to(b) for p in b.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
        if b.exists()
        else set()
    )
    for rel in sorted(files_a ^ files_b):
        diffs.append(f"only in one tree: {rel}")
    for rel in sorted(files_a & files_b):
        if not filecmp.cmp(a / rel, b / rel, shallow=False):
            diffs.append(f"differs: {rel}")
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if committed stubs or descriptor set are stale")
    args = ap.parse_args()
    if not args.check:
        generate(OUT_PKG, DESCRIPTOR)
        print(f"generated {OUT_PKG.relative_to(ROOT)} and {DESCRIPTOR.relative_to(ROOT)}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        pkg, desc = Path(tmp) / "cxr_protos", Path(tmp) / "protos.pb"
        generate(pkg, desc)
        diffs = _same_tree(pkg, OUT_PKG)
        if not DESCRIPTOR.exists() or DESCRIPTOR.read_bytes() != desc.read_bytes():
            diffs.append(f"differs: {DESCRIPTOR.relative_to(ROOT)}")
    if diffs:
        print("generated code is stale; run `make generate` and commit:\n  " + "\n  ".join(diffs), file=sys.stderr)
        sys.exit(1)
    print("generated code is up to date")


if __name__ == "__main__":
    main()
