"""The repository root and the shared data (NIH PNGs, DICOMs, PubMedQA) every test directory reads."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CXR_SHARED_DIR", REPO.parent / "shared"))
DATA = SHARED / "data"
CXR14 = DATA / "cxr14-sample"
DICOM_DIR = DATA / "dicom"
PUBMEDQA = DATA / "pubmedqa"


def cxr14_images(n: int | None = None) -> list[Path]:
    images = sorted((CXR14 / "images").glob("*.png"))
    assert images, f"no NIH sample images under {CXR14} (is ../shared beside the repo?)"
    return images if n is None else images[:n]


def dicom_files() -> list[Path]:
    files = sorted(DICOM_DIR.glob("*.dcm"))
    assert files, f"no DICOM files under {DICOM_DIR}"
    return files
