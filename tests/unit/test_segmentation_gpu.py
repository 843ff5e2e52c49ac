"""On a CUDA device (skipped without one): the GPU path (AMP, channels_last) agrees with the CPU."""

import numpy as np
import pytest
import torch

from cxr_segmentation.config import SegmentationConfig
from cxr_segmentation.masks import logits_to_masks
from cxr_segmentation.model import SegmentationModel
from cxr_serving.device import InferenceDevice
from cxr_serving.images import decode_image
from cxr_serving.settings import PerformanceConfig
from tests.conftest import cxr14_images

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("amp", [False, True])
def test_gpu_masks_agree_with_cpu(amp):
    cfg = SegmentationConfig(input_size=256, allow_untrained=True)
    cpu = SegmentationModel(cfg, InferenceDevice.resolve("cpu", PerformanceConfig()), warmup_batches=0)
    gpu = SegmentationModel(cfg, InferenceDevice.resolve("cuda", PerformanceConfig(use_amp=amp)), warmup_batches=2)
    cpu.load()
    gpu.load()
    assert gpu.device == "cuda"
    images = [decode_image(p.read_bytes()) for p in cxr14_images(4)]
    batch = [gpu.preprocess(i.pixels) for i in images]
    for img, a, b in zip(images, cpu.predict(batch), gpu.predict(batch), strict=True):
        size = (img.height, img.width)
        agree = (logits_to_masks(a, size, 0.5) == logits_to_masks(b, size, 0.5)).mean()
        assert agree > (0.99 if amp else 0.999)
        if not amp:
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-2)
    gpu.unload()


def test_masks_on_device_by_default_on_cuda():
    from cxr_segmentation.model import SegmentationInput

    cfg = SegmentationConfig(input_size=256, allow_untrained=True)
    gpu = SegmentationModel(cfg, InferenceDevice.resolve("cuda", PerformanceConfig()), warmup_batches=1)
    gpu.load()
    assert gpu.masks_on_device
    img = decode_image(cxr14_images(1)[0].read_bytes())
    t = gpu.preprocess(img.pixels)
    masks, logits = gpu.predict([SegmentationInput(t, (img.height, img.width), 0.5), t])
    assert masks.shape == (5, img.height, img.width) and masks.dtype == np.bool_
    np.testing.assert_array_equal(masks, logits_to_masks(logits, (img.height, img.width), 0.5))
    gpu.unload()
