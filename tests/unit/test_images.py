import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from cxr_serving.errors import ImageRejectedError
from cxr_serving.images import DecodeLimits, decode_image, sniff_format
from tests.support.paths import DICOM_DIR, cxr14_images, dicom_files


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("path", dicom_files(), ids=lambda p: p.name)
def test_every_shared_dicom_decodes(path: Path):
    img = decode_image(path.read_bytes(), "application/dicom")
    assert img.format == "dcm"
    assert img.pixels.dtype == np.float32 and img.pixels.ndim == 2
    assert 0.0 <= img.pixels.min() and img.pixels.max() <= 1.0
    assert img.pixels.std() > 0.05  # a real radiograph, not a flat image
    assert img.pixel_spacing_mm is not None


def test_monochrome1_is_inverted_against_pydicoms_own_array():
    path = DICOM_DIR / "nih-dx-mono1-8bit.dcm"
    raw = pydicom.dcmread(path).pixel_array.astype(np.float32) / 255.0
    img = decode_image(path.read_bytes())
    assert img.photometric_interpretation == "MONOCHROME1"
    np.testing.assert_allclose(img.pixels, 1.0 - raw, atol=1e-6)
    mono2 = decode_image((DICOM_DIR / "nih-dx-mono2-8bit.dcm").read_bytes())
    np.testing.assert_allclose(img.pixels, mono2.pixels, atol=1e-6)


def test_jpeg_monochrome1_relabelled_is_inverse_of_original():
    a = decode_image((DICOM_DIR / "siim-cxr-mono2-jpeg-baseline.dcm").read_bytes()).pixels
    b = decode_image((DICOM_DIR / "siim-cxr-relabelled-mono1.dcm").read_bytes()).pixels
    np.testing.assert_allclose(a, 1.0 - b, atol=1e-6)


def test_12bit_window_and_rle_match_the_8bit_source():
    src = decode_image((DICOM_DIR / "nih-dx-mono2-8bit.dcm").read_bytes()).pixels
    win = decode_image((DICOM_DIR / "nih-dx-mono2-12bit-window.dcm").read_bytes())
    rle = decode_image((DICOM_DIR / "nih-dx-mono2-12bit-rle.dcm").read_bytes())
    assert win.bits_stored == 12
    np.testing.assert_allclose(win.pixels, src, atol=1.0 / 255)
    np.testing.assert_array_equal(rle.pixels, win.pixels)


def test_rescale_and_window_are_applied(tmp_path):
    ds = pydicom.dcmread(DICOM_DIR / "nih-dx-mono2-12bit-window.dcm")
    ds.WindowCenter, ds.WindowWidth = 1024, 512  # narrow window: most pixels clip
    buf = io.BytesIO()
    ds.save_as(buf)
    img = decode_image(buf.getvalue())
    raw = ds.pixel_array.astype(np.float64)
    expected = np.clip((raw - (1024 - 0.5)) / (512 - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(img.pixels, expected, atol=1e-5)


def reference_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """What the decoder must return, from pydicom's own pixel array of the same file: pydicom's
    modality LUT, then the DICOM PS3.3 C.11.2.1.2 LINEAR window in float64 (or the stored range
    without one), then MONOCHROME1 inversion; written here independently of cxr_serving.images."""
    from pydicom.pixels import apply_modality_lut

    arr = ds.pixel_array
    if arr.ndim == 3:  # multi-frame: the decoder takes the first frame
        arr = arr[0]
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        first = lambda v: float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v)  # noqa: E731
        c, w = first(ds.WindowCenter), first(ds.WindowWidth)
        out = np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    elif ds.PixelRepresentation == 0 and "RescaleSlope" not in ds:
        out = values / (2**ds.BitsStored - 1)
    else:
        out = (values - values.min()) / (values.max() - values.min())
    return 1.0 - out if ds.PhotometricInterpretation == "MONOCHROME1" else out


# pydicom-data's compressed files, by transfer syntax: a missing one fails the test (no silent skip).
COMPRESSED = {
    "RG1_J2KR.dcm": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless, 15-bit MONOCHROME1 radiograph, windowed
    "RG1_J2KI.dcm": "1.2.840.10008.1.2.4.91",  # JPEG 2000 (lossy), the same radiograph
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",  # JPEG 2000, 16-bit signed
    "JPEG-LL.dcm": "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1, 16-bit signed
    "JPGLosslessP14SV1_1s_1f_8b.dcm": "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1, 8-bit, windowed
    "emri_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless, 12-bit, multi-frame
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless, 16-bit signed, windowed
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",  # RLE lossless
}


@pytest.mark.parametrize("name", sorted(COMPRESSED))
def test_compressed_dicoms_match_pydicoms_own_pixel_array(name):
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"pydicom test file {name} is missing: install pydicom-data (it is a test dependency)")
    data = Path(path).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.file_meta.TransferSyntaxUID == COMPRESSED[name]
    img = decode_image(data)
    expected = reference_pixels(ds)
    assert img.pixels.shape == expected.shape
    np.testing.assert_allclose(img.pixels, expected, atol=1e-5)
    assert float(expected.std()) > 0.01  # a real image, not a flat one that any decode would match


@pytest.mark.parametrize(
    "syntax",
    ["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.5"],
    ids=["jpeg2000-lossless", "jpeg-ls-lossless", "rle"],
)
def test_lossless_transcodes_decode_to_the_same_pixels(syntax):
    """The shared 12-bit windowed radiograph, compressed here with pydicom's encoders."""
    src = (DICOM_DIR / "nih-dx-mono2-12bit-window.dcm").read_bytes()
    ds = pydicom.dcmread(io.BytesIO(src))
    ds.compress(syntax)
    buf = io.BytesIO()
    ds.save_as(buf)
    compressed = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    assert compressed.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(compressed.pixel_array, pydicom.dcmread(io.BytesIO(src)).pixel_array)
    img = decode_image(buf.getvalue())
    np.testing.assert_allclose(img.pixels, reference_pixels(compressed), atol=1e-5)
    np.testing.assert_array_equal(img.pixels, decode_image(src).pixels)


def _with_voi_lut(first_mapped: int, bits: int, photometric: str = "MONOCHROME2") -> bytes:
    """The 12-bit radiograph with a VOI LUT Sequence (a gamma curve) and no window."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(DICOM_DIR / "nih-dx-mono2-12bit-window.dcm")
    del ds.WindowCenter, ds.WindowWidth
    entries = 4096 - first_mapped
    lut = np.round((np.linspace(0, 1, entries) ** 0.5) * (2**bits - 1)).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [entries, first_mapped, bits]
    item.LUTData = lut.tolist()
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = Sequence([item])
    ds.PhotometricInterpretation = photometric
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("first_mapped", "bits", "photometric"),
    [(0, 8, "MONOCHROME2"), (0, 16, "MONOCHROME2"), (1000, 10, "MONOCHROME2"), (0, 12, "MONOCHROME1")],
)
def test_voi_lut_sequence_matches_pydicoms_apply_voi(first_mapped, bits, photometric):
    from pydicom.pixels import apply_voi

    data = _with_voi_lut(first_mapped, bits, photometric)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert "VOILUTSequence" in ds and "WindowCenter" not in ds
    expected = np.asarray(apply_voi(ds.pixel_array, ds, index=0), dtype=np.float64) / (2**bits - 1)
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    img = decode_image(data)
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)
    assert float(expected.std()) > 0.05


@pytest.mark.parametrize("path", cxr14_images()[:20], ids=lambda p: p.name)
def test_nih_sample_pngs(path: Path):
    img = decode_image(path.read_bytes(), "image/png")
    ref = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255
    np.testing.assert_allclose(img.pixels, ref, atol=1e-6)
    assert (img.width, img.height) == (512, 512)


def test_16bit_png_uses_full_range():
    arr = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    img = decode_image(png_bytes(arr))
    assert img.bits_stored == 16
    assert img.pixels.min() == 0.0 and img.pixels.max() == pytest.approx(1.0)
    np.testing.assert_allclose(img.pixels, arr / 65535.0, atol=1e-6)


def test_rgb_and_rgba_become_grayscale():
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 1] = 200
    img = decode_image(png_bytes(rgb))
    assert img.pixels.shape == (64, 64)
    assert img.pixels.mean() == pytest.approx(round(200 * 0.587) / 255, abs=2 / 255)
    rgba = np.dstack([rgb, np.full((64, 64), 255, np.uint8)])
    assert decode_image(png_bytes(rgba)).pixels.shape == (64, 64)


def test_jpeg_decodes(sample_png):
    buf = io.BytesIO()
    Image.open(io.BytesIO(sample_png)).save(buf, format="JPEG", quality=95)
    img = decode_image(buf.getvalue(), "image/jpeg")
    assert img.format == "jpeg" and img.pixels.shape == (512, 512)


@pytest.mark.parametrize(
    ("data", "ctype", "reason"),
    [
        (b"", "", "IMAGE_EMPTY"),
        (b"hello world, not an image at all", "", "IMAGE_FORMAT_UNKNOWN"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "", "IMAGE_CORRUPT"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "", "IMAGE_CORRUPT"),
        (b"\x00" * 128 + b"DICM" + b"\x02\x00" * 20, "", "DICOM_NO_PIXELS"),
    ],
)
def test_garbage_is_rejected_with_reason(data, ctype, reason):
    with pytest.raises(ImageRejectedError) as err:
        decode_image(data, ctype)
    assert err.value.reason == reason


def test_truncated_files_are_rejected(sample_png):
    for cut in (20, 100, len(sample_png) // 2):
        with pytest.raises(ImageRejectedError):
            decode_image(sample_png[:cut])
    dcm = (DICOM_DIR / "nih-dx-mono2-8bit.dcm").read_bytes()
    with pytest.raises(ImageRejectedError):
        decode_image(dcm[: len(dcm) // 2])


def test_content_type_must_match_bytes(sample_png):
    with pytest.raises(ImageRejectedError) as err:
        decode_image(sample_png, "application/dicom")
    assert err.value.reason == "CONTENT_TYPE_MISMATCH"
    with pytest.raises(ImageRejectedError) as err:
        decode_image(sample_png, "image/gif")
    assert err.value.reason == "CONTENT_TYPE_UNSUPPORTED"


def test_format_not_allowed(sample_png):
    limits = DecodeLimits.from_settings(["dcm"], 50, 10**8)
    with pytest.raises(ImageRejectedError, match="allowed_image_formats") as err:
        decode_image(sample_png, limits=limits)
    assert err.value.reason == "IMAGE_FORMAT_NOT_ALLOWED"


def test_byte_size_cap(sample_png):
    limits = DecodeLimits(max_bytes=1000)
    with pytest.raises(ImageRejectedError, match="max_image_size_mb") as err:
        decode_image(sample_png, limits=limits)
    assert err.value.reason == "IMAGE_TOO_LARGE"


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_refused_before_decode():
    with pytest.raises(ImageRejectedError) as err:
        decode_image(_png_header_only(100_000, 100_000))
    assert err.value.reason == "IMAGE_TOO_MANY_PIXELS"


def test_dicom_huge_declared_dimensions_refused():
    ds = pydicom.dcmread(DICOM_DIR / "nih-dx-mono2-8bit.dcm")
    ds.Rows, ds.Columns = 60000, 60000
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ImageRejectedError) as err:
        decode_image(buf.getvalue())
    assert err.value.reason == "IMAGE_TOO_MANY_PIXELS"


def test_dicom_without_pixel_data():
    ds = pydicom.dcmread(DICOM_DIR / "nih-dx-mono2-8bit.dcm")
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ImageRejectedError) as err:
        decode_image(buf.getvalue())
    assert err.value.reason == "DICOM_NO_PIXELS"


def test_zero_size_image_refused():
    with pytest.raises(ImageRejectedError):
        decode_image(_png_header_only(0, 0))


def test_sniff():
    assert sniff_format(b"\x89PNG\r\n\x1a\nxx") == "png"
    assert sniff_format(b"\xff\xd8\xff\xdb") == "jpeg"
    assert sniff_format(b"\x00" * 128 + b"DICM") == "dcm"
    assert sniff_format(b"GIF89a") is None


# -- the input policy (security.min_image_side / max_image_aspect_ratio / max_image_pixels) ----------


def test_input_policy_defaults_are_the_settings_defaults():
    from cxr_serving.settings import SecurityConfig

    sec = SecurityConfig()
    limits = DecodeLimits()
    assert (limits.min_side, limits.max_aspect_ratio, limits.max_pixels) == (
        sec.min_image_side,
        sec.max_image_aspect_ratio,
        sec.max_image_pixels,
    )


@pytest.mark.parametrize(
    ("width", "height", "reason"),
    [
        (16, 16, "IMAGE_TOO_SMALL"),
        (63, 200, "IMAGE_TOO_SMALL"),
        (2000, 100, "IMAGE_ASPECT_RATIO"),
        (100, 401, "IMAGE_ASPECT_RATIO"),
    ],
)
def test_input_policy_refuses_from_the_header(width, height, reason):
    """The header alone decides: the IDAT holds far too little data, so a decode would fail otherwise."""
    with pytest.raises(ImageRejectedError) as err:
        decode_image(_png_header_only(width, height))
    assert err.value.reason == reason


def test_input_policy_boundaries_pass():
    for shape in ((64, 64), (100, 400), (400, 100)):
        assert decode_image(png_bytes(np.full(shape, 90, np.uint8))).pixels.shape == shape


def test_input_policy_comes_from_security_settings():
    from cxr_serving.images import DecodePool
    from cxr_serving.settings import Settings

    settings = Settings.model_validate({"security": {"min_image_side": 16, "max_image_aspect_ratio": 25}})
    pool = DecodePool.from_settings(settings)
    try:
        assert (pool.limits.min_side, pool.limits.max_aspect_ratio) == (16, 25.0)
        assert decode_image(png_bytes(np.zeros((100, 2000), np.uint8)), limits=pool.limits).pixels.shape == (100, 2000)
        assert decode_image(png_bytes(np.zeros((16, 16), np.uint8)), limits=pool.limits).pixels.shape == (16, 16)
    finally:
        pool.close()


@pytest.mark.parametrize(
    ("security", "field"),
    [
        ({"min_image_side": 4}, "min_image_side"),
        ({"max_image_aspect_ratio": 0.5}, "max_image_aspect_ratio"),
        ({"max_image_aspect_ratio": float("nan")}, "max_image_aspect_ratio"),
    ],
)
def test_input_policy_settings_are_validated(security, field):
    from pydantic import ValidationError

    from cxr_serving.settings import Settings

    with pytest.raises(ValidationError, match=field):
        Settings.model_validate({"security": security})


# -- known bad data is IMAGE_CORRUPT; anything else is a defect that propagates ----------------------


def test_a_defect_inside_the_decoder_propagates(monkeypatch, sample_png):
    def broken(*args, **kwargs):
        raise KeyError("injected")

    monkeypatch.setattr("cxr_serving.dicom._dicom_spacing", broken)
    with pytest.raises(KeyError):
        decode_image((DICOM_DIR / "nih-dx-mono2-8bit.dcm").read_bytes())
    monkeypatch.setattr("PIL.Image.open", broken)
    with pytest.raises(KeyError):
        decode_image(sample_png)


def test_dicom_without_required_pixel_elements_is_corrupt():
    ds = pydicom.dcmread(DICOM_DIR / "nih-dx-mono2-8bit.dcm")
    del ds.BitsStored  # pydicom itself would raise AttributeError, which is not mapped
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ImageRejectedError, match="BitsStored") as err:
        decode_image(buf.getvalue())
    assert err.value.reason == "IMAGE_CORRUPT"
