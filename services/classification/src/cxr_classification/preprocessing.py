"""From a decoded radiograph to a model input tensor, in named steps:

    decoded grayscale (uint8, or float32 in [0, 1]) -> crop_center_square (or not)
    -> resize_bilinear -> to [0, 1] -> normalize_imagenet | normalize_xrv -> C x S x S float32 tensor

The decoder (cxr_serving.images) already did bytes -> grayscale with DICOM LUTs and MONOCHROME1
inversion, and applied the input policy (minimum side, aspect ratio). An 8-bit image stays uint8 up
to the resize, which is linear, so it is scaled by 1/255 on the S x S result instead of every pixel.
The resize is torch's antialiased bilinear (`interpolate(..., antialias=True)`) with that kernel's weights,
made once per (input side, output side): for a uint8 image, resize, scaling and normalisation run in one C
pass (`fused_preprocess`, cxr_serving._pixels); otherwise as two sparse matrix products and tensor steps.
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

try:  # optional: built with cxr_serving where a C compiler is; the tensor path below otherwise
    from cxr_serving._pixels import resize_normalize_into
except ImportError:  # pragma: no cover
    resize_normalize_into = None

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
def antialias_table(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's antialiased bilinear weights along one axis (`align_corners=False`) as, for each output index,
    its first input index (int32), its tap count (int32) and K weights (float32, zero past the count): the
    triangle filter widened by the scale when shrinking, each row normalised, computed in the float32 /
    double steps of torch's CPU kernel (UpSampleKernel.cpp) so the weights are its own."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    support = scale if scale >= 1.0 else f32(1.0)
    invscale = np.float64(f32(1.0 / np.float64(scale))) if scale >= 1.0 else np.float64(1.0)
    center = (np.float64(scale) * (np.arange(out_size) + 0.5)).astype(f32)
    lo = np.maximum(((center - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    hi = np.minimum(((center + support).astype(np.float64) + 0.5).astype(np.int64), in_size)
    taps = lo[:, None] + np.arange(int((hi - lo).max()))[None, :]  # out_size x K, past `hi` masked below
    inside = taps < hi[:, None]
    x = (((taps.astype(f32) - center[:, None]).astype(np.float64) + 0.5) * invscale).astype(f32)
    w = np.where(inside, np.maximum(1.0 - np.abs(x).astype(np.float64), 0.0).astype(f32), f32(0.0))
    total = np.zeros(out_size, dtype=f32)
    for k in range(w.shape[1]):  # in tap order, in float32, as the kernel sums them
        total += w[:, k]
    w = np.where(total[:, None] != 0, w / np.where(total == 0, f32(1.0), total)[:, None], w).astype(f32)
    table = (
        lo.astype(np.int32),
        inside.sum(axis=1).astype(np.int32),  # each row's taps are a prefix: ascending and distinct
        np.ascontiguousarray(np.where(inside, w, f32(0.0)), dtype=f32),
    )
    for a in table:
        a.flags.writeable = False  # cached and shared
    return table


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
    """`preprocess` of a uint8 image in one C pass (resize, 1/255, normalisation; cxr_serving._pixels), or
    None where that module is not built or the image is not uint8."""
    if resize_normalize_into is None or pixels.dtype != np.uint8 or pixels.ndim != 2:
        return None
    height, width = pixels.shape
    rows, cols = antialias_table(height, spec.input_size), antialias_table(width, spec.input_size)
    sub, div = channel_affine(spec)
    out = torch.empty((len(sub), spec.input_size, spec.input_size), dtype=torch.float32)
    resize_normalize_into(
        np.ascontiguousarray(pixels), out.numpy(), height, width, *rows, *cols, float(UNIT_8BIT), sub, div
    )
    return out


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
