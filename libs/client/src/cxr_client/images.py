"""Image inputs: a path, raw bytes, base64 text or a ready `cxr.common.v1.Image`."""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from cxr_protos.common.v1 import common_pb2

ImageInput = str | os.PathLike[str] | bytes | common_pb2.Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


def sniff_content_type(data: bytes) -> str:
    """The content type from the magic bytes; empty when unknown (the server then refuses it with a reason)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "application/dicom"
    return ""


def to_image(image: ImageInput) -> common_pb2.Image:
    """A `common_pb2.Image` from a path (str or PathLike), raw bytes, or an Image itself."""
    if isinstance(image, common_pb2.Image):
        return image
    data = image if isinstance(image, bytes) else Path(image).expanduser().read_bytes()
    return common_pb2.Image(data=data, content_type=sniff_content_type(data))


def decode_base64_image(text: str) -> bytes:
    """Bytes of a base64 image, with or without a `data:image/png;base64,` prefix."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"image_base64 is not valid base64: {exc}") from None


def iter_image_files(paths: Iterable[str | os.PathLike[str]], *, recursive: bool = True) -> Iterator[Path]:
    """Files as given, and the images (by suffix) inside folders as given, in sorted order."""
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            yield from sorted(f for f in p.glob(pattern) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield p
