"""From logits to per-class binary masks at the original size, and their encodings.

`logits_to_masks` upsamples the logits (bilinear) to the original image size and only then
thresholds them: thresholding first and resizing a binary mask gives blocky, shifted edges.
`sigmoid(z) >= t` is evaluated as `z >= log(t / (1 - t))`, so no probabilities are materialised.
On the CPU the upsampling is OpenCV's `INTER_LINEAR` (the same half-pixel bilinear as torch's
`align_corners=False`, in float32), which is vectorised where torch's CPU kernel for one plane is not.

Encodings: an 8-bit PNG (0/255) per class, and COCO-style uncompressed RLE (column-major
counts, starting with the count of zeros), which `decode_rle` inverts.

`encode_png` writes the PNG itself (signature, IHDR, one IDAT, IEND): every row with filter type 0,
because Pillow's per-row filter search buys a two-valued mask nothing but time, deflated by ISA-L at
level 1 (`isal`: less CPU than zlib's level 1 on masks, and smaller output; docs/performance-history.md
has the readings). `encode_pngs` does the same for several masks.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from isal import isal_zlib
from PIL import Image as PILImage


def logit_threshold(threshold: float) -> float:
    return math.log(threshold / (1.0 - threshold))


def logits_to_masks(logits: torch.Tensor, size: tuple[int, int], threshold: float) -> np.ndarray:
    """C x h x w logits (on any device) -> C x H x W bool masks at `size` = (H, W), on the CPU."""
    if logits.device.type == "cpu":
        return _masks_opencv(logits.float().numpy(), size, logit_threshold(threshold))
    cut = logit_threshold(threshold)
    out = np.empty((logits.shape[0], *size), dtype=bool)
    for c in range(logits.shape[0]):  # one class at a time: peak memory of one float plane at full size
        z = logits[c].float()[None, None]
        if tuple(z.shape[-2:]) != tuple(size):
            z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
        out[c] = (z[0, 0] >= cut).cpu().numpy()
    return out


def _masks_opencv(logits: np.ndarray, size: tuple[int, int], cut: float) -> np.ndarray:
    """`logits_to_masks` on CPU float32 logits: one plane at a time, as the torch path."""
    height, width = size
    out = np.empty((logits.shape[0], height, width), dtype=bool)
    for c in range(logits.shape[0]):
        plane = np.ascontiguousarray(logits[c])
        if plane.shape != (height, width):
            plane = cv2.resize(plane, (width, height), interpolation=cv2.INTER_LINEAR)
        np.greater_equal(plane, cut, out=out[c])
    return out


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MASK_DEFLATE_LEVEL = 1  # ISA-L's levels are 0-3; 1 codes a mask's long runs well at a fraction of 3's time


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", isal_zlib.crc32(kind + data))


def _png_rows(mask: np.ndarray) -> np.ndarray:
    """The PNG's raw rows: a leading filter-type byte (0: none) per row, then 255 inside the mask."""
    h, w = mask.shape
    rows = np.zeros((h, w + 1), dtype=np.uint8)
    np.multiply(mask, np.uint8(255), out=rows[:, 1:], casting="unsafe")
    return rows


def _png(h: int, w: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit grayscale, deflate, no interlace
    return b"".join((_PNG_SIGNATURE, _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", idat), _png_chunk(b"IEND", b"")))


def encode_png(mask: np.ndarray) -> bytes:
    """One 8-bit grayscale PNG, 255 inside the mask (H x W bool)."""
    if mask.ndim != 2 or 0 in mask.shape:
        raise ValueError(f"expected a non-empty H x W mask, got shape {mask.shape}")
    h, w = mask.shape
    return _png(h, w, isal_zlib.compress(_png_rows(mask).data, MASK_DEFLATE_LEVEL))


def encode_pngs(masks: np.ndarray) -> list[bytes]:
    """`encode_png` of each C x H x W bool mask."""
    if masks.ndim != 3 or 0 in masks.shape[1:]:
        raise ValueError(f"expected C non-empty H x W masks, got shape {masks.shape}")
    return [encode_png(m) for m in masks]


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(data))) > 127


def encode_rle(mask: np.ndarray) -> tuple[list[int], list[int]]:
    """COCO uncompressed RLE: ([height, width], counts) in column-major order, starting with zeros."""
    h, w = mask.shape
    if mask.size == 0:
        return [h, w], []
    # column-major order: OpenCV's transpose copies a 2-D uint8 plane for less than numpy's order="F" (tests/perf)
    flat = cv2.transpose(np.ascontiguousarray(mask, dtype=bool).view(np.uint8)).reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return [h, w], counts


def decode_rle(size: Sequence[int], counts: Sequence[int]) -> np.ndarray:
    h, w = int(size[0]), int(size[1])
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, np.asarray(counts, dtype=np.int64))
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, expected {h}x{w}={h * w}")
    return flat.reshape((h, w), order="F")


@dataclass(frozen=True)
class BoundingBox:
    """Inclusive pixel coordinates."""

    x_min: int
    y_min: int
    x_max: int
    y_max: int

    @property
    def width(self) -> int:
        return self.x_max - self.x_min + 1

    @property
    def height(self) -> int:
        return self.y_max - self.y_min + 1


def bounding_box(mask: np.ndarray) -> BoundingBox | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return BoundingBox(int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))


def area_mm2(area_pixels: int, pixel_spacing_mm: tuple[float, float] | None) -> float:
    """Pixel count times the area of one pixel (row spacing x column spacing); 0 without spacing."""
    if not pixel_spacing_mm:
        return 0.0
    return float(area_pixels) * pixel_spacing_mm[0] * pixel_spacing_mm[1]
