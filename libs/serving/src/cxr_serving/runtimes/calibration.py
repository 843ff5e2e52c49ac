"""The calibration folder split in two, the same way on every host: images int8 calibrates on, and held-back
images the load-time check compares outputs on, so a quantizer is never judged on what it was fitted to."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_serving.errors import CxrError
from cxr_serving.images import DecodedImage, decode_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")


@dataclass(frozen=True)
class CalibrationSplit:
    calibration: tuple[Path, ...]
    check: tuple[Path, ...]


def split_images(folder: Path, calibration_images: int, check_images: int) -> CalibrationSplit:
    """Images ordered by the SHA-256 of their file name (stable across hosts and listings): the first
    `check_images` are held back for the check, the next `calibration_images` calibrate. Raises
    FileNotFoundError / ValueError when the folder cannot give both."""
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration_dir {folder} is not a directory")
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    files.sort(key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    need = calibration_images + check_images
    if len(files) < need:
        raise ValueError(
            f"calibration_dir {folder} has {len(files)} images; check_images + calibration_images need {need}"
        )
    return CalibrationSplit(tuple(files[check_images:need]), tuple(files[:check_images]))


def load_inputs(paths: tuple[Path, ...], preprocess: Callable[[DecodedImage], Any]) -> list[Any]:
    """Each image decoded as a request's would be, then preprocessed by the model (one input tensor each)."""
    out = []
    for p in paths:
        try:
            out.append(preprocess(decode_image(p.read_bytes())))
        except CxrError as exc:
            raise ValueError(f"calibration image {p} is unusable: {exc}") from exc
    return out
