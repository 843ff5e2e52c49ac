"""Decoded grayscale pixels ([0, 1], H x W) -> the network's input tensor (C x S x S).

Named steps composed explicitly (as torchxrayvision/MONAI transforms), and the same steps in one C pass
(`cxr_serving.resize.resize_normalize`) for uint8 and float32 images where that module is built: an 8-bit image
(uint8) is resized before it is scaled to [0, 1] (both linear, a quarter of the work on the small result); resize
to the square network input (bilinear with antialias, as `xrv.utils.fix_resolution`), replicate channels,
normalise. The original size is kept by the caller: masks are brought back to it after the
forward pass (see `masks.logits_to_masks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cxr_segmentation.config import Normalization, SegmentationConfig
from cxr_serving.images import UNIT_8BIT
from cxr_serving.resize import resize_normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_square(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """1 x H x W -> 1 x size x size (bilinear, antialiased when shrinking)."""
    if tuple(pixels.shape[-2:]) == (size, size):
        return pixels
    return F.interpolate(pixels[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def replicate_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    return x if channels == 1 else x.expand(channels, -1, -1)


def normalize(x: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    """imagenet: (x - mean) / std per channel; unit: unchanged [0, 1]; xrv: [-1024, 1024]."""
    if normalization == "unit":
        return x
    if normalization == "xrv":
        return x * 2048.0 - 1024.0
    c = x.shape[0]
    mean = torch.tensor(IMAGENET_MEAN[:c] if c == 3 else (float(np.mean(IMAGENET_MEAN)),), dtype=x.dtype)
    std = torch.tensor(IMAGENET_STD[:c] if c == 3 else (float(np.mean(IMAGENET_STD)),), dtype=x.dtype)
    return (x - mean[:, None, None]) / std[:, None, None]


@dataclass(frozen=True)
class Preprocess:
    """The transform chain of one model."""

    input_size: int
    in_channels: int
    normalization: Normalization

    @classmethod
    def from_config(cls, cfg: SegmentationConfig) -> Preprocess:
        return cls(cfg.input_size, cfg.in_channels, cfg.normalization)

    def channel_affine(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """`normalize` as `(x - sub) / div` per channel of the [0, 1] image (the same float32 results)."""
        c = self.in_channels
        if self.normalization == "unit":
            return (0.0,) * c, (1.0,) * c
        if self.normalization == "xrv":  # x * 2048 - 1024 == (x - 0.5) / (1 / 2048), exactly in float32
            return (0.5,) * c, (1.0 / 2048.0,) * c
        if c == 3:
            return IMAGENET_MEAN, IMAGENET_STD
        return (float(np.mean(IMAGENET_MEAN)),) * c, (float(np.mean(IMAGENET_STD)),) * c

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        if pixels.ndim != 2:
            raise ValueError(f"expected a grayscale H x W image, got shape {pixels.shape}")
        if (fused := resize_normalize(pixels, self.input_size, *self.channel_affine())) is not None:
            return torch.from_numpy(fused)  # resize, scaling to [0, 1] and normalisation in one C pass
        x = torch.from_numpy(np.ascontiguousarray(pixels))[None]
        if x.dtype == torch.uint8:  # 8-bit: resize (linear) first, then scale the small result by 1/255
            x = resize_square(x.float(), self.input_size).mul_(float(UNIT_8BIT))
        else:
            x = resize_square(x.float(), self.input_size)
        x = replicate_channels(x, self.in_channels)
        return normalize(x, self.normalization).contiguous()
