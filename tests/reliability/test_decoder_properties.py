"""Property tests of the image decoder on hostile input: truncation, bit flips, huge
declared dimensions, zero size, wrong content types, 16-bit oddities, DICOM without pixels,
NaN/inf rescale and window values. Outcome: a clean `ImageRejectedError` with a known reason,
or a finite float32 image in [0, 1] (see invariants.py). Never another exception."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from cxr_serving.images import CONTENT_TYPES, DecodeLimits
from fuzz.seeds import raster_variants, seed_inputs
from tests.support.invariants import decode_outcome
from tests.support.paths import DICOM_DIR

warnings.filterwarnings("ignore")

SEEDS = seed_inputs(small_only=True)
SEED_NAMES = sorted(SEEDS)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@FAST
@given(name=st.sampled_from(SEED_NAMES), cut=st.floats(0.0, 1.0))
def test_truncated_files(name, cut):
    data = SEEDS[name]
    decode_outcome(data[: int(len(data) * cut)])


@FAST
@given(name=st.sampled_from(SEED_NAMES), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), max_size=8))
def test_bit_flipped_files(name, flips):
    data = bytearray(SEEDS[name])
    for pos, bit in flips:
        data[min(int(pos * len(data)), len(data) - 1)] ^= 1 << bit
    decode_outcome(bytes(data))


@FAST
@given(
    prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\x00" * 128 + b"DICM"]),
    body=st.binary(max_size=2048),
    ctype=st.sampled_from(["", *CONTENT_TYPES]),
)
def test_random_bytes_behind_magic(prefix, body, ctype):
    decode_outcome(prefix + body, ctype)


@FAST
@given(name=st.sampled_from(SEED_NAMES), ctype=st.one_of(st.sampled_from(list(CONTENT_TYPES)), st.text(max_size=40)))
def test_any_content_type(name, ctype):
    outcome = decode_outcome(SEEDS[name], ctype)
    assert outcome in ("ok", "CONTENT_TYPE_UNSUPPORTED", "CONTENT_TYPE_MISMATCH", "IMAGE_CORRUPT", "DICOM_NO_PIXELS")


def test_zero_size_and_tiny():
    assert decode_outcome(b"") == "IMAGE_EMPTY"
    assert decode_outcome(b"\x89PNG") == "IMAGE_FORMAT_UNKNOWN"
    one_px = io.BytesIO()
    Image.new("L", (1, 1)).save(one_px, "PNG")
    assert decode_outcome(one_px.getvalue()) == "IMAGE_TOO_SMALL"


def _png_with_header(width: int, height: int, bit_depth: int = 8, color_type: int = 0) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)  # far too little data for the declared size
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@FAST
@given(width=st.integers(1, 2**31 - 1), height=st.integers(1, 2**31 - 1))
@example(width=2**31 - 1, height=2**31 - 1)
@example(width=50_000, height=50_000)
def test_png_huge_declared_dimensions_refused_before_decoding(width, height):
    started = time.perf_counter()
    outcome = decode_outcome(_png_with_header(width, height))
    assert time.perf_counter() - started < 2.0  # nothing of the declared size was allocated
    if policy_refusal(width, height) is not None:
        assert outcome in policy_outcomes(width, height)


def policy_refusal(width: int, height: int, frames: int = 1) -> str | None:
    """The input policy's verdict on declared dimensions, in the decoder's order of checks."""
    limits = DecodeLimits()
    if min(width, height) < limits.min_side:
        return "IMAGE_TOO_SMALL"
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        return "IMAGE_ASPECT_RATIO"
    if width * height * max(frames, 1) > limits.max_pixels:
        return "IMAGE_TOO_MANY_PIXELS"
    return None


def policy_outcomes(width: int, height: int, frames: int = 1) -> set[str]:
    """The policy's verdict, or what a library's own header check may say first: Pillow refuses a
    zero side as unidentified (IMAGE_CORRUPT) and a decompression bomb before we see the size."""
    out = {policy_refusal(width, height, frames) or "ok"}
    if width * height * max(frames, 1) > DecodeLimits().max_pixels:
        out.add("IMAGE_TOO_MANY_PIXELS")
    if min(width, height) == 0:
        out.add("IMAGE_CORRUPT")
    return out


def _jpeg_with_size(width: int, height: int) -> bytes:
    data = bytearray(raster_variants()["gray.jpg"])
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(width=st.integers(0, 65535), height=st.integers(0, 65535))
@example(width=65535, height=65535)
def test_jpeg_huge_declared_dimensions(width, height):
    started = time.perf_counter()
    outcome = decode_outcome(_jpeg_with_size(width, height))
    assert time.perf_counter() - started < 5.0
    if policy_refusal(width, height) is not None:
        assert outcome in policy_outcomes(width, height)


def _dicom(mutate, source: str = "nih-dx-mono2-12bit-window.dcm") -> bytes:
    ds = pydicom.dcmread(DICOM_DIR / source)
    mutate(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


@FAST
@given(rows=st.integers(0, 65535), cols=st.integers(0, 65535), frames=st.integers(0, 2**31 - 1))
@example(rows=65535, cols=65535, frames=1)
@example(rows=8, cols=8, frames=2**31 - 1)
@example(rows=64, cols=64, frames=2**31 - 1)
def test_dicom_declared_dimensions_and_frames(rows, cols, frames):
    def mutate(ds):
        ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames

    started = time.perf_counter()
    outcome = decode_outcome(_dicom(mutate))
    assert time.perf_counter() - started < 5.0
    if policy_refusal(cols, rows, frames) is not None:
        assert outcome in policy_outcomes(cols, rows, frames)


@FAST
@given(
    bits_stored=st.integers(0, 40),
    bits_allocated=st.sampled_from([1, 8, 12, 16, 32, 64]),
    high_bit=st.integers(0, 40),
    signed=st.integers(0, 2),
    photometric=st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "", "bogus"]),
)
def test_dicom_16bit_oddities(bits_stored, bits_allocated, high_bit, signed, photometric):
    def mutate(ds):
        ds.BitsStored, ds.BitsAllocated, ds.HighBit = bits_stored, bits_allocated, high_bit
        ds.PixelRepresentation, ds.PhotometricInterpretation = signed, photometric

    decode_outcome(_dicom(mutate))


NUMBERS = st.sampled_from(["nan", "inf", "-inf", "0", "-1", "1e308", "-1e308", "1e-308", "4096", "0.5"])


@FAST
@given(
    center=NUMBERS,
    width=NUMBERS,
    slope=NUMBERS,
    intercept=NUMBERS,
    function=st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID", "X"]),
)
@example(center="0", width="nan", slope="1", intercept="0", function="LINEAR")  # used to return NaN pixels
@example(center="2048", width="4096", slope="nan", intercept="0", function="LINEAR")
def test_dicom_window_and_rescale_values(center, width, slope, intercept, function):
    def mutate(ds):
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept

    decode_outcome(_dicom(mutate))


@pytest.mark.parametrize("field", ["WindowWidth", "WindowCenter", "RescaleSlope"])
def test_nan_header_values_are_refused_not_returned_as_nan_pixels(field):
    def mutate(ds):
        setattr(ds, field, "nan")
        if field == "RescaleSlope":
            del ds.WindowCenter, ds.WindowWidth

    assert decode_outcome(_dicom(mutate)) == "IMAGE_CORRUPT"


@pytest.mark.parametrize("source", ["nih-dx-mono2-8bit.dcm", "siim-cxr-mono2-jpeg-baseline.dcm"])
def test_dicom_without_pixel_data(source):
    def mutate(ds):
        del ds.PixelData

    assert decode_outcome(_dicom(mutate, source)) == "DICOM_NO_PIXELS"


@FAST
@given(values=st.lists(st.integers(0, 65535), min_size=64, max_size=64), side=st.integers(64, 80))
def test_png_16bit_arbitrary_values(values, side):
    arr = np.resize(np.array(values, dtype=np.uint16), (side, side))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    assert decode_outcome(buf.getvalue()) == "ok"
