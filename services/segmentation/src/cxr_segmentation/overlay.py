"""A colour overlay PNG for humans: the radiograph in gray, each class tinted in its own colour."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image as PILImage

PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (128, 0, 0),
)


def colour_for(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def render_overlay(
    pixels: np.ndarray, masks: np.ndarray | Sequence[np.ndarray], alpha: float = 0.4, max_side: int = 1024
) -> bytes:
    """`pixels` H x W in [0, 1]; `masks` C x H x W bool. Scaled down so the longer side <= max_side."""
    h, w = pixels.shape
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    gray = PILImage.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if scale < 1.0:
        gray = gray.resize(size, PILImage.Resampling.BILINEAR)
    rgb = np.repeat(np.asarray(gray, dtype=np.float32)[..., None], 3, axis=2)
    for i, mask in enumerate(masks):
        m = mask
        if scale < 1.0:
            m = np.asarray(PILImage.fromarray(mask.astype(np.uint8) * 255).resize(size, PILImage.Resampling.NEAREST))
        sel = m.astype(bool)
        if sel.any():
            rgb[sel] = (1.0 - alpha) * rgb[sel] + alpha * np.asarray(colour_for(i), dtype=np.float32)
    buf = io.BytesIO()
    PILImage.fromarray(rgb.astype(np.uint8), mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
