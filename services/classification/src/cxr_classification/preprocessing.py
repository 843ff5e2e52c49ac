"""From a decoded radiograph to a model input tensor, in named steps:

    decoded grayscale (uint8, or float32 in [0, 1]) -> crop_center_square (or not)
    -> resize_bilinear -> to [0, 1] -> normalize_imagenet | normalize_xrv -> C x S x S float32 tensor

The decoder (cxr_serving.images) already did bytes -> grayscale with DICOM LUTs and MONOCHROME1
inversion, and applied the input policy (minimum side, aspect ratio). An 8-bit image stays uint8 up
to the resize, which is linear, so it is scaled by 1/255 on the S x S result instead of every pixel.
The resize is torch's antialiased bilinear (`interpolate(..., antialias=True)`) with that kernel's weights,
made once per (input side, output side; `cxr_serving.resize`): resize, scaling and normalisation run in one C
pass (`fused_preprocess`), for uint8 and float32 images alike; without the C module, as two sparse matrix products
and tensor steps.
Conventions per checkpoint family:
- ImageNet (CheXNet, timm): 3 identical channels, each normalised with ImageNet mean/std;
- torchxrayvision: 1 channel scaled to [-1024, 1024] (`xrv.utils.normalize(img, 255)`),
  centre-cropped to a square (`XRayCenterCrop`) and resized.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from cxr_classification.config import ClassifierConfig
from cxr_serving.images import UNIT_8BIT
from cxr_serving.resize import antialias_table, resize_normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
XRV_RANGE = 1024.0
_IMAGENET_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_IMAGENET_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


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


@functools.lru_cache(maxsize=32)
def antialias_weights(in_size: int, out_size: int) -> torch.Tensor:
    """out_size x in_size sparse (CSR) float32 matrix of `antialias_table`'s weights."""
    lo, n, w = antialias_table(in_size, out_size)
    inside = np.arange(w.shape[1])[None, :] < n[:, None]
    taps = lo[:, None].astype(np.int64) + np.arange(w.shape[1])[None, :]
    crow = np.concatenate(([0], np.cumsum(n.astype(np.int64))))
    with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR x dense is all that is used
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(crow),
            torch.from_numpy(taps[inside]),
            torch.from_numpy(w[inside]),
            (out_size, in_size),
            check_invariants=False,
        )


def resize_bilinear(image: torch.Tensor, size: int) -> torch.Tensor:
    """1 x H x W float32 -> 1 x size x size, antialiased bilinear (torchvision's tensor `resize`; torch's
    `interpolate(antialias=True)` within float32 rounding, for less CPU)."""
    height, width = image.shape[-2:]
    if (height, width) == (size, size):
        return image
    columns: torch.Tensor = torch.sparse.mm(antialias_weights(height, size), image[0])  # size x W
    out: torch.Tensor = torch.sparse.mm(antialias_weights(width, size), columns.T.contiguous())  # transposed
    return out.T.contiguous()[None]


def normalize_imagenet(image: torch.Tensor, in_chans: int) -> torch.Tensor:
    """1 x S x S in [0, 1] -> in_chans x S x S with ImageNet mean/std (grayscale: their averages)."""
    if in_chans == 3:
        return (image.expand(3, -1, -1) - _IMAGENET_MEAN) / _IMAGENET_STD
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


def channel_affine(spec: PreprocessSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(sub, div) per output channel: the normalisation as `(x - sub) / div` of the [0, 1] image."""
    if spec.normalization == "xrv":  # (2x - 1) * 1024 == (x - 0.5) / (1 / 2048), exactly in float32
        return (0.5,) * spec.in_chans, (1.0 / (2.0 * XRV_RANGE),) * spec.in_chans
    if spec.in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (sum(IMAGENET_MEAN) / 3,) * spec.in_chans, (sum(IMAGENET_STD) / 3,) * spec.in_chans


def fused_preprocess(pixels: np.ndarray, spec: PreprocessSpec) -> torch.Tensor | None:
    """`preprocess` of a uint8 or float32 image in one C pass (`cxr_serving.resize.resize_normalize`), or None
    where that module is not built or the samples are of another type."""
    sub, div = channel_affine(spec)
    out = resize_normalize(pixels, spec.input_size, sub, div)
    return None if out is None else torch.from_numpy(out)


def preprocess(pixels: np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """Decoded grayscale pixels (H x W, uint8 or float in [0, 1]) -> the model's C x S x S float32 input."""
    if spec.resize == "center_crop":
        pixels = crop_center_square(pixels)
    if (fused := fused_preprocess(pixels, spec)) is not None:
        return fused
    image = unit_tensor(pixels, spec.input_size)
    if spec.normalization == "xrv":
        return normalize_xrv(image, spec.in_chans)
    return normalize_imagenet(image, spec.in_chans)
