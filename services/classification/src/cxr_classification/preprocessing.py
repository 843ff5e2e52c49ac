"""From a decoded radiograph to a model input tensor, in named steps:

    decoded grayscale (uint8, or float32 in [0, 1]) -> crop_center_square (or not)
    -> resize_bilinear -> to [0, 1] -> normalize_imagenet | normalize_xrv -> C x S x S float32 tensor

The decoder (cxr_serving.images) already did bytes -> grayscale with DICOM LUTs and MONOCHROME1
inversion, and applied the input policy (minimum side, aspect ratio). An 8-bit image stays uint8 up
to the resize, which is linear, so it is scaled by 1/255 on the S x S result instead of every pixel.
Conventions per checkpoint family:
- ImageNet (CheXNet, timm): 3 identical channels, each normalised with ImageNet mean/std;
- torchxrayvision: 1 channel scaled to [-1024, 1024] (`xrv.utils.normalize(img, 255)`),
  centre-cropped to a square (`XRayCenterCrop`) and resized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cxr_classification.config import ClassifierConfig
from cxr_serving.images import UNIT_8BIT

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
XRV_RANGE = 1024.0


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything preprocessing depends on; models with equal specs share one tensor."""

    input_size: int
    resize: str  # "center_crop" | "squash"
    normalization: str  # "imagenet" | "xrv"
    in_chans: int

    @classmethod
    def from_config(cls, cfg: ClassifierConfig) -> PreprocessSpec:
        return cls(
            cfg.input_size,
            cfg.resize,
            str(cfg.normalization),
            int(cfg.in_chans or 3),
        )


def crop_center_square(pixels: np.ndarray) -> np.ndarray:
    """The largest centred square (torchxrayvision's XRayCenterCrop)."""
    h, w = pixels.shape[:2]
    side = min(h, w)
    top, left = h // 2 - side // 2, w // 2 - side // 2
    return pixels[top : top + side, left : left + side]


def resize_bilinear(image: torch.Tensor, size: int) -> torch.Tensor:
    """1 x H x W -> 1 x size x size, antialiased bilinear (torchvision's tensor `resize`)."""
    if image.shape[-2:] == (size, size):
        return image
    out = torch.nn.functional.interpolate(
        image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return out[0]


def normalize_imagenet(image: torch.Tensor, in_chans: int) -> torch.Tensor:
    """1 x S x S in [0, 1] -> in_chans x S x S with ImageNet mean/std (grayscale: their averages)."""
    if in_chans == 3:
        mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=image.dtype).view(3, 1, 1)
        return (image.expand(3, -1, -1) - mean) / std
    return (image - sum(IMAGENET_MEAN) / 3) / (sum(IMAGENET_STD) / 3)


def normalize_xrv(image: torch.Tensor, in_chans: int) -> torch.Tensor:
    """[0, 1] -> [-1024, 1024], torchxrayvision's convention (`(2 * x / maxval - 1) * 1024`)."""
    out = (2.0 * image - 1.0) * XRV_RANGE
    return out.expand(in_chans, -1, -1).contiguous() if in_chans != 1 else out


def unit_tensor(pixels: np.ndarray, size: int) -> torch.Tensor:
    """H x W grayscale (uint8 for value / 255, or float in [0, 1]) -> 1 x size x size float32 in [0, 1]."""
    image = torch.from_numpy(np.ascontiguousarray(pixels))[None]
    if image.dtype != torch.uint8:
        return resize_bilinear(image.float(), size)
    return resize_bilinear(image.float(), size).mul_(float(UNIT_8BIT))  # .float() copied: in place is safe


def preprocess(pixels: np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """Decoded grayscale pixels (H x W, uint8 or float in [0, 1]) -> the model's C x S x S float32 input."""
    if spec.resize == "center_crop":
        pixels = crop_center_square(pixels)
    image = unit_tensor(pixels, spec.input_size)
    if spec.normalization == "xrv":
        return normalize_xrv(image, spec.in_chans)
    return normalize_imagenet(image, spec.in_chans)
