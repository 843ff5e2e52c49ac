"""The decode and preprocessing path as it was before the uint8 fast paths (Pillow, pydicom's own pixel
plugins, float32 from the first step), kept as the reference the fast paths are compared with."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pillow_pixels(data: bytes) -> np.ndarray:
    """An 8-bit grayscale PNG/JPEG through Pillow, or an 8-bit MONOCHROME2/1 DICOM through `ds.pixel_array`
    (pylibjpeg for JPEG baseline), as float32 in [0, 1]."""
    if data[128:132] == b"DICM":
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data))
        pixels = ds.pixel_array.astype(np.float32) / 255.0
        return 1.0 - pixels if ds.PhotometricInterpretation == "MONOCHROME1" else pixels
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) * (1.0 / 255.0)


def reference_input(pixels: np.ndarray, size: int, resize: str, normalization: str, channels: int) -> torch.Tensor:
    """crop (or not) -> antialiased bilinear resize of the float image -> ImageNet or xrv normalisation."""
    if resize == "center_crop":
        h, w = pixels.shape
        side = min(h, w)
        top, left = h // 2 - side // 2, w // 2 - side // 2
        pixels = pixels[top : top + side, left : left + side]
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = x[0]
    if normalization == "xrv":
        out = (2.0 * x - 1.0) * 1024.0
        return out.expand(channels, -1, -1).contiguous() if channels != 1 else out
    if channels == 3:
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x.expand(3, -1, -1) - mean) / std
    return (x - sum(IMAGENET_MEAN) / 3) / (sum(IMAGENET_STD) / 3)
