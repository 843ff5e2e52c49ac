"""The segmentation Dice check (min 0.98 per class) on a U-Net whose masks mean something: a U-Net/resnet18 @64
pseudo-trained for a few seconds on the NIH images (bench/pseudo_trained_unet.py), served by the real
segmentation service over gRPC. OpenVINO int8 passes the unchanged bound; the same int8 recipe calibrated on
blank images (a genuinely damaged quantization) is refused and float32 torch serves; the random-init U-Net's
masks are near-empty, which is why the bench uses the pseudo-trained checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from bench.pseudo_trained_unet import PseudoTraining, pseudo_masks, train_checkpoint
from cxr_protos.common.v1 import common_pb2
from cxr_protos.segmentation.v1 import segmentation_service_pb2 as spb
from cxr_protos.segmentation.v1 import segmentation_service_pb2_grpc as sgrpc
from cxr_segmentation.service import build_binding
from cxr_serving.runtimes.calibration import split_images
from tests.support.paths import CXR14, REPO, cxr14_images
from tests.support.servers import auth, make_settings, running_server

IMAGES = CXR14 / "images"
CALIBRATION, CHECK = 16, 24
SMALL = PseudoTraining(encoder="resnet18", input_size=64, train_size=64, steps=40, final_steps=0)
FLOAT_DECODER = ["/net/decoder/", "/net/segmentation_head/"]  # as bench/runtimes.py


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    """Trained on the images the check does not hold back (the same split the service makes), once per cache
    key into the git-ignored var/cache (a rerun reuses it)."""
    held_back = set(split_images(IMAGES, CALIBRATION, CHECK).check)
    images = [p for p in sorted(IMAGES.glob("*.png")) if p not in held_back][:80]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few small steps: one thread is as fast, and never oversubscribes a shared host
    try:
        return train_checkpoint(SMALL, images, REPO / "var" / "cache" / "test-pseudo-trained")
    finally:
        torch.set_num_threads(threads)


def _settings(checkpoint: Path, tmp_path: Path, calibration_dir: Path = IMAGES, **runtime):
    runtime = {
        "calibration_dir": str(calibration_dir),
        "cache_dir": str(tmp_path / "cache"),
        "calibration_images": CALIBRATION,
        "check_images": CHECK,
        **runtime,
    }
    seg = {"enabled": True, "input_size": SMALL.input_size, "encoder": SMALL.encoder, "runtime": runtime}
    if checkpoint.is_file():
        seg["checkpoint_path"] = checkpoint.name
    else:
        seg["allow_untrained"] = True
    return make_settings(models_path=str(checkpoint.parent), models__segmentation=seg, performance__warmup_batches=0)


async def _listed_and_served(settings):
    async with running_server(settings, build_binding(settings)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = sgrpc.SegmentationServiceStub(ch)
            (listed,) = (await stub.ListModels(spb.ListModelsRequest(), metadata=auth())).models
            image = common_pb2.Image(data=cxr14_images(1)[0].read_bytes(), content_type="image/png")
            resp = await stub.SegmentImage(spb.SegmentImageRequest(image=image), metadata=auth())
    return listed, resp.model


def _min_class_dice(note: str) -> float:
    return float(re.search(r"min_class_dice=([0-9.]+)", note).group(1))


def test_pseudo_masks_are_compact_non_empty_and_deterministic():
    from cxr_serving.images import decode_image

    pixels = decode_image(cxr14_images(1)[0].read_bytes()).pixels[::2, ::2]  # 256 px
    masks = pseudo_masks(pixels)
    assert masks.shape == (5, 256, 256) and np.array_equal(masks, pseudo_masks(pixels))
    area = masks.sum(axis=(1, 2))
    assert (area > 0.005 * 256 * 256).all()  # none empty: an empty mask's Dice moves with one pixel
    from scipy import ndimage

    assert [ndimage.label(m)[1] for m in masks] == [1] * 5  # one connected region each


async def test_int8_of_a_trained_unet_passes_the_unchanged_dice_bound(checkpoint, tmp_path):
    """int8 encoder, float decoder (`int8_float_layers`, the bench's U-Net recipe): the 0.98 bound passes."""
    settings = _settings(checkpoint, tmp_path, backend="openvino", precision="int8", int8_float_layers=FLOAT_DECODER)
    listed, served = await _listed_and_served(settings)
    assert (listed.backend, listed.precision) == ("openvino", "int8"), listed.runtime_note
    assert (served.backend, served.precision) == ("openvino", "int8")
    assert not listed.untrained
    assert 0.98 <= _min_class_dice(listed.runtime_note) < 1.0  # quantized (not float32's masks), within the bound


async def test_int8_calibrated_on_blank_images_damages_the_masks_and_is_refused(checkpoint, tmp_path):
    """The check still refuses a genuinely bad runtime: calibration on blank images gives int8 activation
    ranges that clip real images, and the masks change beyond the bound."""
    from PIL import Image

    folder = tmp_path / "calibration"
    folder.mkdir()
    for p in sorted(IMAGES.glob("*.png")):
        (folder / p.name).symlink_to(p)
    for p in split_images(folder, CALIBRATION, CHECK).calibration:  # the check images stay real
        p.unlink()
        Image.new("L", (512, 512), 128).save(p)
    settings = _settings(
        checkpoint, tmp_path, folder, backend="openvino", precision="int8", int8_float_layers=FLOAT_DECODER
    )
    listed, served = await _listed_and_served(settings)
    assert (listed.backend, listed.precision) == ("torch", "float32")
    assert (served.backend, served.precision) == ("torch", "float32")
    note = listed.runtime_note
    assert note.startswith("float32 torch serves: openvino/int8 failed the accuracy check against float32 torch")
    assert "< 0.98" in note and _min_class_dice(note) < 0.98
