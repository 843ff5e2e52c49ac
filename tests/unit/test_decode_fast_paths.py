"""The uint8 fast paths (`png_gray8`, else OpenCV, for 8-bit PNG; simplejpeg for grayscale JPEG and
JPEG-baseline DICOM; resize before the 1/255 scaling, in one C pass where built) give the Pillow path's model
inputs and outputs, on 20 shared NIH radiographs in four formats. Tolerances (docs/reliability.md): float32
rounding (1e-5) everywhere, except JPEG-baseline DICOM, where libjpeg-turbo and pydicom's libjpeg plugin differ
by at most one grey level per pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench._common import nih_inputs
from cxr_classification.preprocessing import PreprocessSpec, preprocess
from cxr_segmentation.preprocessing import Preprocess
from cxr_serving.errors import ImageRejectedError
from cxr_serving.images import decode_image
from tests.support.paths import dicom_files
from tests.support.pillow_reference import pillow_pixels, reference_input

N = 20
EXACT = ("png", "jpeg", "dcm")  # the same pixels as Pillow / pydicom
ONE_GREY_LEVEL = 1.0 / 255.0
IMAGENET_MIN_STD = 0.224


@pytest.fixture(scope="module")
def inputs() -> dict[str, list[bytes]]:
    return {fmt: nih_inputs(fmt, N) for fmt in (*EXACT, "dcm_jpeg")}


@pytest.mark.parametrize("fmt", EXACT)
def test_8bit_inputs_decode_to_uint8_equal_to_pillow(inputs, fmt):
    for data in inputs[fmt]:
        decoded = decode_image(data)
        assert decoded.array.dtype == np.uint8  # one uint8 image, scaled to [0, 1] only after resizing
        reference = pillow_pixels(data)
        np.testing.assert_allclose(decoded.pixels, reference, rtol=0, atol=1e-7)
        assert decoded.pixels.dtype == np.float32


def test_jpeg_baseline_dicom_within_one_grey_level_of_pydicom(inputs):
    files = [*inputs["dcm_jpeg"], *(p.read_bytes() for p in dicom_files() if "jpeg-baseline" in p.name)]
    diffs = []
    for data in files:
        decoded = decode_image(data)
        assert decoded.array.dtype == np.uint8
        diff = np.abs(decoded.pixels - pillow_pixels(data))
        diffs.append(diff.mean())
        assert diff.max() <= ONE_GREY_LEVEL + 1e-7
    assert float(np.mean(diffs)) < 0.1 * ONE_GREY_LEVEL  # a few pixels per image, not a shifted image


SPECS = [PreprocessSpec(224, "squash", "imagenet", 3), PreprocessSpec(224, "center_crop", "xrv", 1)]


@pytest.mark.parametrize("fmt", [*EXACT, "dcm_jpeg"])
@pytest.mark.parametrize("spec", SPECS, ids=["imagenet", "xrv"])
def test_classifier_input_equals_the_pillow_path(inputs, fmt, spec):
    scale = 2048.0 if spec.normalization == "xrv" else 1.0  # xrv spans [-1024, 1024]: 1e-5 of its range
    atol = 1e-5 * scale
    if fmt == "dcm_jpeg":  # one grey level through the linear resize and normalisation
        atol = ONE_GREY_LEVEL * (scale if spec.normalization == "xrv" else 1.0 / IMAGENET_MIN_STD) + atol
    for data in inputs[fmt]:
        ours = preprocess(decode_image(data).array, spec)
        theirs = reference_input(pillow_pixels(data), spec.input_size, spec.resize, spec.normalization, spec.in_chans)
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape
        assert float((ours - theirs).abs().max()) <= atol, fmt


@pytest.mark.parametrize("fmt", EXACT)
def test_segmentation_input_equals_the_pillow_path(inputs, fmt):
    transform = Preprocess(256, 3, "imagenet")
    for data in inputs[fmt]:
        ours = transform(decode_image(data).array)
        theirs = reference_input(pillow_pixels(data), 256, "squash", "imagenet", 3)
        assert float((ours - theirs).abs().max()) <= 1e-5


@pytest.fixture(scope="module")
def densenet():
    """The real untrained DenseNet-121 at 224 px (seed 0), as the service builds it."""
    from cxr_classification.config import MultiLabelClassifierConfig
    from cxr_classification.model import ChestXrayClassifier
    from cxr_serving.device import InferenceDevice
    from cxr_serving.settings import PerformanceConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu = InferenceDevice.resolve("cpu", PerformanceConfig())
    model = ChestXrayClassifier("multi", MultiLabelClassifierConfig(allow_untrained=True, input_size=224), cpu)
    model.load()
    yield model
    model.unload()
    torch.set_num_threads(threads)  # later tests keep the process's thread count


@pytest.mark.parametrize(("fmt", "atol"), [("png", 1e-5), ("jpeg", 1e-5), ("dcm", 1e-5), ("dcm_jpeg", 1e-3)])
def test_classifier_outputs_equal_the_pillow_path(inputs, densenet, fmt, atol):
    from cxr_classification.model import ClassifierInput

    spec = densenet.spec
    ours = [ClassifierInput(densenet.preprocess(decode_image(d))) for d in inputs[fmt]]
    theirs = [
        ClassifierInput(
            reference_input(pillow_pixels(d), spec.input_size, spec.resize, spec.normalization, spec.in_chans)
        )
        for d in inputs[fmt]
    ]
    a = np.stack([o.probabilities for o in densenet.predict(ours)])
    b = np.stack([o.probabilities for o in densenet.predict(theirs)])
    assert a.shape == (N, len(densenet.labels))
    assert float(np.abs(a - b).max()) <= atol


def test_truncated_jpeg_and_png_are_refused_as_corrupt(inputs):
    for fmt in ("jpeg", "png"):
        data = inputs[fmt][0]
        with pytest.raises(ImageRejectedError) as err:
            decode_image(data[: len(data) * 2 // 3])
        assert err.value.reason == "IMAGE_CORRUPT", fmt


def _with_pixel_data(data: bytes, pixel_data: bytes, rows: int, cols: int) -> bytes:
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.Rows, ds.Columns, ds.PixelData = rows, cols, pixel_data
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_uncompressed_8bit_dicom_pixels_are_pydicoms_at_every_length(inputs):
    """The uncompressed 8-bit frame read straight from its bytes equals pydicom's `pixel_array`, for an odd
    pixel count (a pad byte), extra bytes (pydicom trims them) and the shared DICOMs; too few bytes stay corrupt."""
    import io

    import pydicom

    from cxr_serving.dicom import _Header, _native_gray8

    odd = np.arange(513 * 511, dtype=np.uint32).astype(np.uint8).tobytes()  # 262143 bytes: saved with a pad byte
    plain = inputs["dcm"][0]
    shared = [p.read_bytes() for p in dicom_files() if "8bit" in p.name]
    cases = [*inputs["dcm"], *shared, _with_pixel_data(plain, odd, 513, 511),
             _with_pixel_data(plain, pydicom.dcmread(io.BytesIO(plain)).PixelData + bytes(512), 512, 512)]  # fmt: skip
    native = 0
    for data in cases:
        ds = pydicom.dcmread(io.BytesIO(data))
        view = _native_gray8(_Header(ds), ds.Rows, ds.Columns, 1)
        native += view is not None
        reference = pillow_pixels(data)
        np.testing.assert_allclose(decode_image(data).pixels, reference, rtol=0, atol=1e-7)  # x / 255 as x * (1 / 255)
        if view is not None:
            np.testing.assert_array_equal(view, ds.pixel_array)
    assert native == len(cases) - 1  # all but the one with extra bytes, which pydicom reads
    short = _with_pixel_data(plain, bytes(512 * 512 - 512), 512, 512)
    with pytest.raises(ImageRejectedError) as err:
        decode_image(short)
    assert err.value.reason == "IMAGE_CORRUPT"
