"""The classifier's resize (two sparse products with torch's antialiased bilinear weights) is torch's
`interpolate(antialias=True)`: the same weights, bit for bit, for shrinking and enlarging, and the same
image within float32 rounding on NIH radiographs at their own and other sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxr_classification.preprocessing import antialias_weights, resize_bilinear
from cxr_serving.images import decode_image
from tests.support.paths import cxr14_images

IN_SIZES = (64, 100, 224, 255, 256, 300, 511, 512, 513, 1021, 1024, 1733, 2048, 3000)
OUT_SIZES = (64, 128, 224, 256, 299, 384, 512)


def torch_weights(in_size: int, out_size: int) -> torch.Tensor:
    """torch's own weights: the identity's rows, each resized along one axis (out_size x in_size)."""
    eye = torch.eye(in_size)[None, None]
    resized = F.interpolate(eye, size=(in_size, out_size), mode="bilinear", align_corners=False, antialias=True)
    return resized[0, 0].T


@pytest.mark.parametrize("in_size", IN_SIZES)
def test_weights_are_torchs_own(in_size):
    for out_size in OUT_SIZES:
        ours = antialias_weights(in_size, out_size)
        assert ours.layout == torch.sparse_csr and ours.dtype == torch.float32
        assert torch.equal(ours.to_dense(), torch_weights(in_size, out_size)), (in_size, out_size)


def torch_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def test_resize_equals_torch_interpolate_on_nih_radiographs():
    worst = 0.0
    for path in cxr14_images(8):
        gray = decode_image(path.read_bytes()).array  # 512 x 512 uint8
        for image in (gray, gray[:433, 37:], np.ascontiguousarray(gray[::4, ::3])):  # own, cropped, small
            x = torch.from_numpy(np.ascontiguousarray(image))[None].float()
            for size in (224, 256, 299, 512):
                ours = resize_bilinear(x, size)
                assert ours.shape == (1, size, size) and ours.is_contiguous()
                worst = max(worst, float((ours - torch_resize(x, size)).abs().max()))
    assert worst <= 2e-4  # on the 0-255 scale: float32 rounding of sums of up to ~20 products (1e-6 relative)
