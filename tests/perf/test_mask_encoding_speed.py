"""The segmentation service's per-image mask work (issue 23, target 1) is cheaper than the code it replaced, by
CPU-time ratios taken in turn in one process on masks of the served U-Net for NIH radiographs (never an
absolute time): upsampling and thresholding five planes to the radiograph's 512 x 512 (OpenCV against torch), the
column-major RLE (OpenCV's transpose against numpy's order="F"), and the PNGs at 2048 x 2048 (ISA-L's deflate
against zlib level 1). bench/README.md has the serving-path numbers."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxr_segmentation.config import SegmentationConfig
from cxr_segmentation.masks import encode_pngs, encode_rle, logit_threshold, logits_to_masks
from cxr_segmentation.model import SegmentationModel
from cxr_segmentation.networks import output_logits
from cxr_serving.device import InferenceDevice
from cxr_serving.images import decode_image
from cxr_serving.settings import PerformanceConfig
from tests.support.cpu_time import best_cpu_of_turns
from tests.support.paths import cxr14_images

pytestmark = pytest.mark.slow
CLINICAL = (2048, 2048)


@pytest.fixture(scope="module")
def nih_case() -> tuple[torch.Tensor, tuple[int, int]]:
    model = SegmentationModel(
        SegmentationConfig(encoder="resnet18", input_size=64, allow_untrained=True),
        InferenceDevice.resolve("cpu", PerformanceConfig()),
        warmup_batches=0,
    )
    net = model.build(None)[0].eval()
    image = decode_image(cxr14_images(1)[0].read_bytes())
    with torch.inference_mode():
        return output_logits(net, model.preprocess(image)[None])[0], (image.height, image.width)


def torch_masks(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    out = np.empty((logits.shape[0], *size), dtype=bool)
    for c in range(logits.shape[0]):  # the replaced code: one plane at a time, torch's bilinear
        z = F.interpolate(logits[c][None, None], size=size, mode="bilinear", align_corners=False)
        out[c] = (z[0, 0] >= logit_threshold(0.5)).numpy()
    return out


def numpy_rle(mask: np.ndarray) -> list[int]:
    flat = mask.ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    return np.diff(np.concatenate(([0], change, [flat.size]))).tolist()


def zlib_pngs(masks: np.ndarray) -> list[bytes]:
    rows = np.zeros((masks.shape[1], masks.shape[2] + 1), dtype=np.uint8)
    out = []
    for m in masks:
        rows[:, 1:] = m * np.uint8(255)
        out.append(zlib.compress(rows.tobytes(), 1))
    return out


def test_mask_upsampling_rle_and_png_cost_less_cpu(nih_case):
    logits, size = nih_case
    masks = logits_to_masks(logits, size, 0.5)
    clinical = logits_to_masks(logits, CLINICAL, 0.5)  # a radiograph's own size: where PNG coding costs most
    t = best_cpu_of_turns(
        {
            "opencv_masks": lambda: logits_to_masks(logits, size, 0.5),
            "torch_masks": lambda: torch_masks(logits, size),
            "opencv_rle": lambda: [encode_rle(m) for m in masks],
            "numpy_rle": lambda: [numpy_rle(m) for m in masks],
            "isal_pngs": lambda: encode_pngs(clinical),
            "zlib_pngs": lambda: zlib_pngs(clinical),
        }
    )
    print({k: round(1000 * v, 3) for k, v in t.items()})
    ratios = {
        "masks": (t["torch_masks"] / t["opencv_masks"], 2.0),
        "rle": (t["numpy_rle"] / t["opencv_rle"], 2.0),
        "pngs": (t["zlib_pngs"] / t["isal_pngs"], 2.0),  # 5.3x here
    }
    slow = {k: round(r, 2) for k, (r, least) in ratios.items() if r < least}
    assert not slow, f"speed-up below its floor: {slow}"
