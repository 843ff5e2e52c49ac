"""On a CUDA device (skipped without one): the GPU path (AMP, channels_last) agrees with the CPU."""

import numpy as np
import pytest

from cxr_segmentation.config import SegmentationConfig
from cxr_segmentation.masks import logits_to_masks
from cxr_segmentation.model import SegmentationModel
from cxr_serving.device import InferenceDevice
from cxr_serving.images import decode_image
from cxr_serving.settings import PerformanceConfig
from tests.support.cuda import NEEDS_CUDA
from tests.support.paths import cxr14_images

pytestmark = NEEDS_CUDA


# (use_amp, tf32, least mask agreement, largest relative logit error ||gpu - cpu|| / ||cpu||).
# TF32 (the GPU default) rounds convolution inputs to 10 mantissa bits: seen on an H200, logits moved by
# up to 0.13 on values of 2-10 (relative error ~1e-3) while 99.9 % of mask pixels agreed; float32 (TF32
# off) stays near 1e-5; bfloat16 (8 bits) near 1e-2.
@pytest.mark.parametrize(
    ("amp", "tf32", "agreement", "rel_err"),
    [(False, False, 0.9999, 1e-4), (False, True, 0.999, 5e-3), (True, True, 0.99, 5e-2)],
    ids=["float32", "tf32", "bf16"],
)
def test_gpu_masks_agree_with_cpu(amp, tf32, agreement, rel_err):
    cfg = SegmentationConfig(input_size=256, allow_untrained=True)
    cpu = SegmentationModel(cfg, InferenceDevice.resolve("cpu", PerformanceConfig()), warmup_batches=0)
    perf = PerformanceConfig(use_amp=amp, tf32=tf32)
    gpu = SegmentationModel(cfg, InferenceDevice.resolve("cuda", perf), warmup_batches=0)
    cpu.load()
    gpu.load()
    assert gpu.device == "cuda"
    images = [decode_image(p.read_bytes()) for p in cxr14_images(4)]
    batch = [gpu.preprocess(i.pixels) for i in images]
    for img, a, b in zip(images, cpu.predict(batch), gpu.predict(batch), strict=True):
        size = (img.height, img.width)
        agree = (logits_to_masks(a, size, 0.5) == logits_to_masks(b, size, 0.5)).mean()
        assert agree > agreement
        err = float(np.linalg.norm(b.numpy() - a.numpy()) / np.linalg.norm(a.numpy()))
        assert np.isfinite(err) and err < rel_err, err
    gpu.unload()


def test_masks_on_device_by_default_on_cuda():
    from cxr_segmentation.model import SegmentationInput

    cfg = SegmentationConfig(input_size=256, allow_untrained=True)
    gpu = SegmentationModel(cfg, InferenceDevice.resolve("cuda", PerformanceConfig()), warmup_batches=1)
    gpu.load()
    assert gpu.masks_on_device
    img = decode_image(cxr14_images(1)[0].read_bytes())
    t = gpu.preprocess(img.pixels)
    size = (img.height, img.width)
    # one call each, so both run the same batch-1 forward (within one batch, the rows of a TF32
    # convolution can round differently: 22 of 1.3 million mask pixels did on an H200)
    (masks,) = gpu.predict([SegmentationInput(t, size, 0.5)])
    (logits,) = gpu.predict([t])
    assert masks.shape == (5, img.height, img.width) and masks.dtype == np.bool_
    np.testing.assert_array_equal(masks, logits_to_masks(logits.to("cuda"), size, 0.5))
    # on the CPU, bilinear resizing rounds differently and a pixel whose logit sits at the threshold can flip
    assert (masks == logits_to_masks(logits, size, 0.5)).mean() > 0.9999
    gpu.unload()
