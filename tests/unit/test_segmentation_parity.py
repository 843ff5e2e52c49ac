"""Our served network gives the same logits as the reference implementations loaded with the same
weights: segmentation-models-pytorch's own model, and torchxrayvision's ChestX-Det PSPNet."""

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import torchvision.transforms.functional as TF

from cxr_segmentation.config import XRV_PSPNET_CLASSES, SegmentationConfig
from cxr_segmentation.model import SegmentationModel
from cxr_serving.device import InferenceDevice
from cxr_serving.images import decode_image
from cxr_serving.settings import PerformanceConfig
from tests.support.paths import cxr14_images

CPU = InferenceDevice.resolve("cpu", PerformanceConfig())
# the PSPNet served eagerly: its trace's self-check (12 forwards at 512 x 512) and the batchnorm fold took 33 of the
# test's 37 s; what is compared here is the network and its weight layout against xrv's. Not compared: the traced and
# folded PSPNet against xrv (each load checks its trace and its fold against the eager network instead)
EAGER_CPU = InferenceDevice.resolve("cpu", PerformanceConfig(trace_models=False, fold_batchnorm=False))


def nih_pixels(size=None):
    img = decode_image(cxr14_images(1)[0].read_bytes())
    return img.pixels if size is None else img.pixels[:size, :size]


@pytest.mark.parametrize(
    ("arch", "encoder", "suffix"),
    [("Unet", "resnet18", ".pt"), ("FPN", "resnet18", ".safetensors")],
)
def test_smp_parity(tmp_path, arch, encoder, suffix):
    cfg = SegmentationConfig(architecture=arch, encoder=encoder, input_size=64, classes=["a", "b", "c"])
    torch.manual_seed(1)
    reference = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=3, classes=3).eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    else:
        torch.save(reference.state_dict(), path)
    model = SegmentationModel(cfg, CPU, default_checkpoint=path, warmup_batches=0)
    model.load()
    pixels = nih_pixels()
    ours = model.predict([model.preprocess(pixels), model.preprocess(pixels[::-1].copy())])

    # reference preprocessing written independently: torchvision resize + ImageNet normalisation
    def ref_input(p):
        x = TF.resize(torch.from_numpy(p)[None], [64, 64], antialias=True).repeat(3, 1, 1)
        return TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

    with torch.inference_mode():
        expected = reference(torch.stack([ref_input(pixels), ref_input(pixels[::-1].copy())]))
    assert expected.shape == (2, 3, 64, 64)
    for i in range(2):
        torch.testing.assert_close(ours[i], expected[i], rtol=1e-4, atol=1e-4)


def test_untrained_weights_are_deterministic_and_flagged():
    cfg = SegmentationConfig(encoder="resnet18", input_size=64, allow_untrained=True)
    a, b = (SegmentationModel(cfg, CPU, warmup_batches=0) for _ in range(2))
    a.load()
    b.load()
    x = a.preprocess(nih_pixels())
    torch.testing.assert_close(a.predict([x])[0], b.predict([x])[0])
    assert a.untrained and a.version == "untrained"


@pytest.mark.slow  # ~10 s on 2 CPU cores: a 14-class dilated ResNet-101 PSPNet at 512x512, built twice
def test_torchxrayvision_pspnet_parity(tmp_path):
    """torchxrayvision's PSPNet() downloads `pspnet_chestxray_best_model_4.pth` in its constructor unless the
    file is already in `cache_dir`: we write a random-weight checkpoint in that exact layout (DataParallel
    `module.` keys), let xrv load it, and load the same file with checkpoint_format xrv_pspnet."""
    xrv_chestx_det = pytest.importorskip("torchxrayvision.baseline_models.chestx_det")
    from torchxrayvision.baseline_models.chestx_det.ptsemseg.pspnet import pspnet

    torch.manual_seed(2)
    net = pspnet(len(XRV_PSPNET_CLASSES))
    ckpt = tmp_path / "pspnet_chestxray_best_model_4.pth"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, ckpt)
    reference = xrv_chestx_det.PSPNet(cache_dir=str(tmp_path)).eval()
    assert [t.lower().replace(" ", "_") for t in reference.targets] == list(XRV_PSPNET_CLASSES)

    cfg = SegmentationConfig(checkpoint_format="xrv_pspnet", checkpoint_path=str(ckpt))
    assert cfg.input_size == 512 and cfg.classes == list(XRV_PSPNET_CLASSES)
    model = SegmentationModel(cfg, EAGER_CPU, default_checkpoint=ckpt, warmup_batches=0)
    model.load()
    pixels = nih_pixels()  # 512 x 512: no resize on either side
    ours = model.predict([model.preprocess(pixels)])[0]
    with torch.inference_mode():
        expected = reference(torch.from_numpy(pixels * 2048.0 - 1024.0)[None, None])[0]
    assert ours.shape == expected.shape == (14, 512, 512)
    torch.testing.assert_close(ours, expected, rtol=1e-3, atol=1e-3)
    assert np.isfinite(ours.numpy()).all()


def test_masks_made_in_the_batch_equal_masks_made_from_logits():
    """`masks_on_device` (the GPU path, forced here on the CPU) gives the same masks as the pool path."""
    from cxr_segmentation.masks import logits_to_masks
    from cxr_segmentation.model import SegmentationInput

    cfg = SegmentationConfig(encoder="resnet18", input_size=64, allow_untrained=True, masks_on_device=True)
    model = SegmentationModel(cfg, CPU, warmup_batches=0)
    model.load()
    assert model.masks_on_device
    a, b = nih_pixels(), nih_pixels(300)[:, :200]
    ta, tb = model.preprocess(a), model.preprocess(b)
    masks_a, logits_b, masks_b = model.predict(
        [SegmentationInput(ta, a.shape, 0.5), tb, SegmentationInput(tb, b.shape, 0.3)]
    )
    assert masks_a.shape == (5, *a.shape) and masks_b.shape == (5, 300, 200) and masks_a.dtype == bool
    np.testing.assert_array_equal(masks_a, logits_to_masks(model.predict([ta])[0], a.shape, 0.5))
    np.testing.assert_array_equal(masks_b, logits_to_masks(logits_b, b.shape, 0.3))
    assert not SegmentationModel(cfg.model_copy(update={"masks_on_device": None}), CPU).masks_on_device
