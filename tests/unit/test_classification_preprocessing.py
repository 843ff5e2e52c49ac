"""Preprocessing matches each checkpoint family's own convention on real NIH images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
import torchxrayvision as xrv
from PIL import Image

from cxr_classification.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessSpec,
    crop_center_square,
    preprocess,
)
from cxr_serving.images import decode_image
from tests.support.paths import cxr14_images


@pytest.fixture(scope="module")
def nih_png():
    path = cxr14_images(1)[0]
    return path.read_bytes(), np.asarray(Image.open(path).convert("L"))


def test_xrv_normalisation_and_crop_equal_torchxrayvision(nih_png):
    data, raw = nih_png
    pixels = decode_image(data).pixels
    ours = preprocess(pixels, PreprocessSpec(raw.shape[0], "center_crop", "xrv", 1)).numpy()
    theirs = xrv.datasets.XRayCenterCrop()(xrv.datasets.normalize(raw, 255)[None])
    assert ours.shape == theirs.shape == (1, *raw.shape)
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)  # float32 of [-1024, 1024]: ~1e-4 relative


def test_imagenet_path_equals_torchvision_transforms(nih_png):
    data, raw = nih_png
    pixels = decode_image(data).pixels
    ours = preprocess(pixels, PreprocessSpec(224, "squash", "imagenet", 3))
    rgb = TF.to_dtype(TF.to_image(Image.fromarray(raw).convert("RGB")), torch.float32, scale=True)
    theirs = TF.normalize(TF.resize(rgb, [224, 224], antialias=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert ours.shape == (3, 224, 224)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_center_crop_takes_the_middle_square():
    img = np.arange(6 * 10, dtype=np.float32).reshape(6, 10)
    out = crop_center_square(img)
    assert out.shape == (6, 6) and out[0, 0] == img[0, 2]
    out = crop_center_square(img.T)
    assert out.shape == (6, 6) and out[0, 0] == img.T[2, 0]


def test_grayscale_single_channel_imagenet():
    out = preprocess(np.full((100, 100), 0.5, np.float32), PreprocessSpec(64, "squash", "imagenet", 1))
    assert out.shape == (1, 64, 64)
    assert float(out.mean()) == pytest.approx((0.5 - sum(IMAGENET_MEAN) / 3) / (sum(IMAGENET_STD) / 3), abs=1e-5)


def test_resize_modes_on_a_landscape_image():
    img = np.zeros((300, 400), np.float32)
    img[:, :50] = 1.0  # a bright band at the left edge
    crop = preprocess(img, PreprocessSpec(64, "center_crop", "xrv", 1))
    squash = preprocess(img, PreprocessSpec(64, "squash", "xrv", 1))
    assert crop.shape == squash.shape == (1, 64, 64)
    assert float(crop[0, :, :4].max()) == -1024.0  # the crop cut the band off
    assert float(squash[0, :, :4].min()) > 1000.0  # squashing keeps it
