"""The one-pass preprocessing of uint8 and float32 images (`cxr_serving.resize.resize_normalize`: resize, scaling
to [0, 1] and normalisation in C) equals each service's tensor path within 1e-5 (xrv: 1e-5 of its 2048 range), on
NIH radiographs, the shared 12-bit DICOMs (float32 after their LUTs) and odd shapes: the classifier's (sparse
products, then torch's normalisation) for every spec, segmentation's (torch's `interpolate`, then its
normalisation) for every normalisation, which takes the C pass; other sample types and a build without the module
take the tensor paths; the C function checks its buffers and runs without the GIL."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_classification import preprocessing as prep
from cxr_classification.preprocessing import PreprocessSpec, preprocess
from cxr_segmentation.preprocessing import Preprocess
from cxr_serving import resize
from cxr_serving._pixels import resize_normalize_into
from cxr_serving.images import decode_image
from cxr_serving.resize import antialias_table
from tests.support.gil import assert_runs_without_the_gil
from tests.support.paths import cxr14_images, dicom_files

SPECS = [
    PreprocessSpec(224, "squash", "imagenet", 3),
    PreprocessSpec(224, "squash", "imagenet", 1),
    PreprocessSpec(224, "center_crop", "xrv", 1),
    PreprocessSpec(320, "squash", "xrv", 3),
    PreprocessSpec(512, "center_crop", "imagenet", 3),
]


def tensor_path(pixels: np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    if spec.resize == "center_crop":
        pixels = prep.crop_center_square(pixels)
    image = prep.unit_tensor(pixels, spec.input_size)
    if spec.normalization == "xrv":
        return prep.normalize_xrv(image, spec.in_chans)
    return prep.normalize_imagenet(image, spec.in_chans)


def atol(spec: PreprocessSpec) -> float:
    return 1e-5 * (2 * prep.XRV_RANGE if spec.normalization == "xrv" else 1.0)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    nih = [decode_image(p.read_bytes()).array for p in cxr14_images(12)]
    rng = np.random.default_rng(23)
    odd = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(600, 300), (97, 1000), (224, 224), (64, 64)]]
    return nih + odd + [np.full((300, 200), 255, np.uint8), np.zeros((256, 256), np.uint8)]


@pytest.fixture(scope="module")
def float_images() -> list[np.ndarray]:
    """float32 in [0, 1]: the shared DICOMs of more than 8 bits as the decoder gives them, and odd shapes."""
    deep = [decode_image(p.read_bytes()).array for p in dicom_files()]
    deep = [a for a in deep if a.dtype == np.float32]
    assert len(deep) >= 2, "the shared data should hold at least two DICOMs of more than 8 bits"
    rng = np.random.default_rng(5)
    odd = [rng.random(shape, dtype=np.float32) for shape in [(600, 300), (97, 1000), (224, 224)]]
    return deep + odd + [np.ones((300, 200), np.float32), np.zeros((64, 64), np.float32)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_one_pass_equals_the_tensor_path(images, float_images, spec):
    for pixels in images + float_images:
        fused = prep.fused_preprocess(prep.crop_center_square(pixels) if spec.resize == "center_crop" else pixels, spec)
        assert fused is not None, (pixels.dtype, pixels.shape)
        reference = tensor_path(pixels, spec)
        assert fused.shape == reference.shape == (spec.in_chans, spec.input_size, spec.input_size)
        assert fused.dtype == torch.float32 and fused.is_contiguous()
        assert float((fused - reference).abs().max()) <= atol(spec)
        assert torch.equal(preprocess(pixels, spec), fused)


def test_other_sample_types_and_a_build_without_the_module_take_the_tensor_path(images, float_images, monkeypatch):
    spec = SPECS[0]
    for other in (float_images[0].astype(np.float64), float_images[0].astype(np.float16)):
        assert prep.fused_preprocess(other, spec) is None
        assert torch.equal(preprocess(other, spec), tensor_path(other, spec))
    monkeypatch.setattr(resize, "_resize_normalize_into", None)
    seg = Preprocess(256, 3, "imagenet")
    for pixels in (images[0], float_images[0]):
        assert prep.fused_preprocess(pixels, spec) is None
        assert torch.equal(preprocess(pixels, spec), tensor_path(pixels, spec))
        assert torch.equal(seg(pixels), segmentation_tensor_path(seg, pixels, monkeypatch))


def segmentation_tensor_path(seg: Preprocess, pixels: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    import cxr_segmentation.preprocessing as seg_prep

    with monkeypatch.context() as m:
        m.setattr(seg_prep, "resize_normalize", lambda *args: None)
        return seg(pixels)


@pytest.mark.parametrize(
    "seg",
    [Preprocess(256, 3, "imagenet"), Preprocess(512, 1, "imagenet"), Preprocess(64, 3, "unit"),
     Preprocess(320, 1, "xrv"), Preprocess(128, 2, "imagenet")],
    ids=str,
)  # fmt: skip
def test_segmentation_one_pass_equals_its_tensor_path(images, float_images, seg, monkeypatch):
    bound = 1e-5 * (2048 if seg.normalization == "xrv" else 1.0)
    for pixels in images + float_images:
        fused = seg(pixels)
        reference = segmentation_tensor_path(seg, pixels, monkeypatch)
        assert fused.shape == reference.shape == (seg.in_channels, seg.input_size, seg.input_size)
        assert fused.dtype == torch.float32 and fused.is_contiguous()
        assert float((fused - reference).abs().max()) <= bound, seg
        one_pass = resize.resize_normalize(pixels, seg.input_size, *seg.channel_affine())
        assert one_pass is not None and torch.equal(fused, torch.from_numpy(one_pass))  # it took the C pass


def _call(src: np.ndarray, out: np.ndarray, rows=None, cols=None, sub=(0.5,), div=(0.25,)) -> None:
    h, w = src.shape
    rows = rows or antialias_table(h, 8)
    cols = cols or antialias_table(w, 8)
    resize_normalize_into(src, out, h, w, *rows, *cols, 1 / 255, sub, div)


def test_the_c_function_checks_its_buffers():
    src = np.zeros((32, 40), np.uint8)
    out = np.zeros((1, 8, 8), np.float32)
    _call(src, out)
    with pytest.raises(ValueError, match="src"):
        resize_normalize_into(src, out, 32, 41, *antialias_table(32, 8), *antialias_table(40, 8), 1.0, (0,), (1,))
    with pytest.raises(ValueError, match="out"):
        _call(src, np.zeros((2, 8, 8), np.float32))
    lo, n, w = antialias_table(32, 8)
    beyond = lo.copy()
    beyond[-1] += 1  # the last output's taps would read one row past the image
    with pytest.raises(ValueError, match="row weights: output 7 reads outside"):
        _call(src, out, rows=(beyond, n, w))
    with pytest.raises(ValueError, match="weights"):
        _call(src, out, rows=(lo, n, w[:-1]))
    fewer = n.copy()
    fewer[3] -= 1  # a tap's weight left past the count: the column pass would read it
    with pytest.raises(ValueError, match="row weights: output 3 has a weight past its tap count"):
        _call(src, out, rows=(lo, fewer, w))
    with pytest.raises(ValueError, match="channels"):
        _call(src, out, sub=(), div=())
    with pytest.raises(ValueError, match="channels"):
        _call(src, out, sub=(0.5, 0.5), div=(1.0,))
    with pytest.raises(TypeError):
        _call(src, out.tobytes())  # read-only out
    _call(src.astype(np.float32), out)
    for other in (src.astype(np.float64), src.astype(np.int16), src.astype(">f4")):
        with pytest.raises(ValueError, match="src must hold uint8 or native float32 samples"):
            _call(other, out)
    with pytest.raises(ValueError, match=r"src must hold height\*width samples"):
        resize_normalize_into(
            src.astype(np.float32), out, 32, 41, *antialias_table(32, 8), *antialias_table(41, 8), 1.0, (0,), (1,)
        )
    misaligned = np.frombuffer(bytearray(32 * 40 * 4 + 1), np.uint8)[1:].view(np.float32).reshape(32, 40)
    with pytest.raises(ValueError, match="aligned"):
        _call(misaligned, out)
    with pytest.raises(ValueError, match="contiguous"):
        _call(np.zeros((32, 80), np.float32)[:, ::2], out)
    with pytest.raises(ValueError, match="src"):  # uint8 bytes of a float32 image's length
        resize_normalize_into(src.astype(np.float32).view(np.uint8), out, 32, 40, *antialias_table(32, 8),
                              *antialias_table(40, 8), 1.0, (0,), (1,))  # fmt: skip


def test_resizing_lets_other_threads_run():
    """The C loops run without the GIL, so decode threads (and the event loop) run beside them."""
    src = np.full((8192, 8192), 7, np.uint8)
    out = np.empty((3, 224, 224), np.float32)
    rows = cols = antialias_table(8192, 224)

    def call() -> None:
        for _ in range(4):  # long enough for the gaps to tell, also on a fast host
            resize_normalize_into(src, out, 8192, 8192, *rows, *cols, 1 / 255, (0.1, 0.2, 0.3), (1.0, 2.0, 3.0))

    assert_runs_without_the_gil(call)
    assert np.allclose(out[1], (7 / 255 - 0.2) / 2.0, atol=1e-6)


_DECODE_THREAD_PROBE = """
import os, sys, threading
import torch
from cxr_classification.preprocessing import PreprocessSpec, preprocess
from cxr_segmentation import preprocessing as seg_prep
from cxr_serving import resize
from cxr_serving.images import decode_image
from cxr_serving.os_thread_name import name_os_thread
from tests.support.paths import dicom_files

torch.set_num_threads(2)
if "libgomp" not in open("/proc/self/maps").read():  # another OpenMP may keep its workers in a shared pool
    print("skip: torch did not load libgomp")
    raise SystemExit(0)
if sys.argv[1] == "tensor":  # the control: the tensor paths, as a build without the C module takes
    resize._resize_normalize_into = None
pixels = [a for a in (decode_image(p.read_bytes()).array for p in dicom_files()) if a.dtype.kind == "f"]
done, release = threading.Event(), threading.Event()


def decode_thread():
    name_os_thread("decode-probe")  # OpenMP workers this thread starts inherit the name
    for a in pixels:
        preprocess(a, PreprocessSpec(224, "squash", "imagenet", 3))
        seg_prep.Preprocess(256, 3, "imagenet")(a)
    done.set()
    release.wait(60)


thread = threading.Thread(target=decode_thread)
thread.start()
done.wait(60)
names = []
for tid in os.listdir("/proc/self/task"):
    try:
        names.append(open(f"/proc/self/task/{tid}/comm").read().strip())
    except OSError:
        pass
release.set()
thread.join()
print(len(pixels), "images; threads named decode-probe:", names.count("decode-probe"))
"""


@pytest.mark.parametrize("path", ["c", "tensor"])
def test_a_decode_thread_preprocessing_float_images_starts_no_openmp_team(path):
    """Both services' preprocessing of the shared 12-bit DICOMs (float32) on a decode thread, with 2 torch threads,
    in a child process: the C pass leaves that thread alone (a team beside the forward thread's makes forwards
    wait to wake theirs); the tensor path, the control, starts a team the probe sees."""
    import subprocess
    import sys

    from tests.support.paths import REPO

    out = subprocess.run([sys.executable, "-c", _DECODE_THREAD_PROBE, path], cwd=REPO, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    if out.stdout.startswith("skip: "):
        pytest.skip(out.stdout.strip().removeprefix("skip: "))
    images, _, count = out.stdout.strip().partition(" images; threads named decode-probe: ")
    assert int(images) >= 2 and count, out.stdout + out.stderr
    if path == "c":
        assert int(count) == 1, out.stdout + out.stderr  # the decode thread only
    else:
        assert int(count) > 1, out.stdout + out.stderr
