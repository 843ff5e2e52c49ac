"""Seed inputs for the decoder fuzzer and the property tests: real files from ../shared/data
and pydicom's test data (compressed transfer syntaxes), plus small variants of a real NIH
radiograph in every raster flavour the decoder handles (8/16-bit PNG, RGB, JPEG)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CXR_SHARED_DIR", REPO.parent / "shared")) / "data"

# pydicom / pydicom-data files: compressed syntaxes, signed 16-bit, RGB, and one without pixels.
PYDICOM_FILES = (
    "MR_small.dcm",  # 16-bit signed, explicit VR
    "MR_small_RLE.dcm",
    "CT_small.dcm",
    "JPEG2000.dcm",
    "JPEG-lossy.dcm",
    "SC_rgb_rle.dcm",
    "rtplan.dcm",  # no pixel data
    "JPEG-LL.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
    "RG1_J2KI.dcm",
)


def shared_dicoms() -> list[Path]:
    return sorted((DATA / "dicom").glob("*.dcm"))


def shared_pngs(n: int = 3) -> list[Path]:
    return sorted((DATA / "cxr14-sample" / "images").glob("*.png"))[:n]


def pydicom_files() -> list[Path]:
    from pydicom.data import get_testdata_file

    out = []
    for name in PYDICOM_FILES:
        try:
            path = get_testdata_file(name)
        except Exception:  # pydicom-data not installed or no network: skip that file
            path = None
        if path:
            out.append(Path(path))
    return out


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def raster_variants(side: int = 64) -> dict[str, bytes]:
    """Small PNG/JPEG variants of a real radiograph."""
    src = Image.open(shared_pngs(1)[0]).convert("L").resize((side, side))
    arr8 = np.asarray(src)
    arr16 = (arr8.astype(np.uint16) * 257).astype(np.uint16)
    return {
        "png8.png": _encode(src, "PNG"),
        "png16.png": _encode(Image.fromarray(arr16), "PNG"),
        "rgb.png": _encode(src.convert("RGB"), "PNG"),
        "rgba.png": _encode(src.convert("RGBA"), "PNG"),
        "palette.png": _encode(src.convert("P"), "PNG"),
        "gray.jpg": _encode(src, "JPEG", quality=80),
        "rgb.jpg": _encode(src.convert("RGB"), "JPEG", quality=80),
        "progressive.jpg": _encode(src, "JPEG", progressive=True),
    }


def seed_inputs(small_only: bool = False, max_bytes: int | None = None) -> dict[str, bytes]:
    """name -> bytes. `small_only` leaves out files over 300 kB (faster fuzzing), `max_bytes` over that."""
    limit = max_bytes if max_bytes is not None else 300_000 if small_only else None
    seeds = dict(raster_variants())
    for path in [*shared_pngs(), *shared_dicoms(), *pydicom_files()]:
        if limit is not None and path.stat().st_size > limit:
            continue
        seeds[path.name] = path.read_bytes()
    return seeds


def write_corpus(directory: Path, small_only: bool = False, max_bytes: int | None = None) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    seeds = seed_inputs(small_only, max_bytes)
    for name, data in seeds.items():
        (directory / name).write_bytes(data)
    return len(seeds)
