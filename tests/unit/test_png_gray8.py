"""The 8-bit grayscale PNG decoder (`cxr_serving.png_gray8`: zlib-ng inflate, row filters undone in C) gives
OpenCV's samples, byte for byte, on every shared NIH PNG and on every filter type at sizes around the C code's
four-row wavefront; any file outside its scope or not well formed (malformed deflate streams that zlib refuses
among them) is left to the general decoder, whose answer (pixels or refusal) is the one `decode_image` gave
without this path; bytes after the zlib stream are ignored, as libpng does."""

from __future__ import annotations

import zlib

import cv2
import numpy as np
import pytest

from cxr_serving import png_gray8
from cxr_serving.errors import ImageRejectedError
from cxr_serving.images import decode_image
from tests.support.gil import assert_runs_without_the_gil
from tests.support.paths import CXR14, cxr14_images
from tests.support.png_writer import (
    chunk,
    filtered_rows,
    gray8_png,
    ihdr,
    incomplete_code_stream,
    opencv_decode,
    random_filter_mixes,
    symbol_286_stream,
    zlib_header,
)


def outcome(data: bytes) -> tuple[str, object]:
    try:
        return "ok", decode_image(data).array
    except ImageRejectedError as exc:
        return "rejected", exc.reason


def outcome_without_fast_path(data: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[str, object]:
    with monkeypatch.context() as m:
        m.setattr(png_gray8, "unfilter_into", None)
        return outcome(data)


def same_outcome(a: tuple[str, object], b: tuple[str, object]) -> bool:
    if a[0] != b[0]:
        return False
    return np.array_equal(a[1], b[1]) if a[0] == "ok" else a[1] == b[1]


def test_every_shared_nih_png_takes_this_path_and_equals_opencv():
    paths = [*cxr14_images(), *sorted((CXR14 / "originals").glob("*.png"))]
    taken = 0
    for path in paths:
        data = path.read_bytes()
        fast, reference = png_gray8.decode(data), opencv_decode(data)
        if reference.ndim == 2:  # the 8-bit grayscale ones; two originals are RGBA
            assert fast is not None, path.name
            assert fast.dtype == np.uint8 and fast.flags.c_contiguous and fast.flags.writeable
            assert np.array_equal(fast, reference), path.name
            assert np.array_equal(decode_image(data).array, reference)
            taken += 1
        else:
            assert fast is None, path.name
    assert taken >= 300


FILTER_PATTERNS = {
    "paeth": lambda h: [4] * h,
    "cycle": lambda h: [y % 5 for y in range(h)],
    "paeth_runs": lambda h: [4 if y % 7 < 5 else y % 4 for y in range(h)],
}


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 7, 64, 513])
@pytest.mark.parametrize("height", [1, 2, 3, 4, 5, 6, 9, 17])
@pytest.mark.parametrize("pattern", sorted(FILTER_PATTERNS))
def test_each_filter_at_sizes_around_the_wavefront_equals_opencv(width, height, pattern):
    rng = np.random.default_rng(width * 1000 + height)
    image = rng.integers(0, 256, (height, width), dtype=np.uint8)
    image[: height // 2] = np.cumsum(image[: height // 2], axis=1, dtype=np.uint8)  # smooth rows too
    data = gray8_png(image, FILTER_PATTERNS[pattern](height))
    fast = png_gray8.decode(data)
    assert fast is not None
    assert np.array_equal(fast, image)
    assert np.array_equal(fast, opencv_decode(data))


def test_random_filter_bytes_and_samples_agree_with_opencv_or_are_left_to_it():
    """Arbitrary filtered streams (filter bytes 0-5): where any row's filter is above 4 the path declines and
    `decode_image` refuses as before; otherwise it reconstructs exactly what OpenCV does."""
    rng = np.random.default_rng(23)
    declined = 0
    for _ in range(300):
        h, w = int(rng.integers(1, 12)), int(rng.integers(1, 40))
        raw = bytearray(rng.integers(0, 256, h * (w + 1), dtype=np.uint8).tobytes())
        raw[:: w + 1] = rng.choice([0, 1, 2, 3, 4, 4, 4, 5], h).astype(np.uint8).tobytes()
        data = gray8_png(np.zeros((h, w), np.uint8), stream=zlib.compress(bytes(raw)))
        fast, reference = png_gray8.decode(data), opencv_decode(data)
        if max(raw[:: w + 1]) > 4:
            assert fast is None
            declined += 1
        else:
            assert fast is not None and np.array_equal(fast, reference)
    assert 0 < declined < 300


@pytest.mark.parametrize("height", [16, 17, 31, 32, 33, 48, 70])
def test_sixteen_row_lanes_equal_opencv_for_every_filter_mix(height):
    """The SSE2 path (16 rows at once, for blocks where a quarter or more of the rows filter by their left
    neighbour) on streams of arbitrary bytes, half of them drawn from the extremes where 8-bit Paeth could
    overflow, at widths around its 16-column tiles; each block mixes filter types at random."""
    for width, trial, data in random_filter_mixes(height, (32, 33, 40, 47, 48, 49, 64, 100, 257)):
        fast = png_gray8.decode(data)
        assert fast is not None and np.array_equal(fast, opencv_decode(data)), (width, trial)


NIH = np.asarray(cv2.imread(str(cxr14_images(1)[0]), cv2.IMREAD_UNCHANGED))[:96, :80].copy()
_STREAM = zlib.compress(filtered_rows(NIH, [4] * NIH.shape[0]))
_TEXT = chunk(b"tEXt", b"Comment\x00chest")


def _with_idat_crc_broken() -> bytes:
    data = bytearray(gray8_png(NIH))
    at = data.index(b"IDAT") + 4 + (len(data) - data.index(b"IDAT")) // 3
    data[at] ^= 0x40
    return bytes(data)


OUT_OF_SCOPE = {
    "trns": gray8_png(NIH, before_idat=[chunk(b"tRNS", b"\x00\x00")]),
    "gama": gray8_png(NIH, before_idat=[chunk(b"gAMA", (45455).to_bytes(4, "big"))]),
    "unknown_ancillary": gray8_png(NIH, before_idat=[chunk(b"cxRq", b"x")]),
    "idat_crc": _with_idat_crc_broken(),
    "text_crc": gray8_png(NIH, after_idat=[chunk(b"tEXt", b"a\x00b", crc=1)]),
    "no_iend": gray8_png(NIH, end=False),
    "cut_short": gray8_png(NIH)[:-200],
    "idat_split_by_text": gray8_png(NIH, idat_parts=3, between_idat=[_TEXT]),
    "incomplete_huffman_code": gray8_png(NIH, [0] * 96, stream=incomplete_code_stream(filtered_rows(NIH, [0] * 96))),
    "undefined_length_symbol": gray8_png(np.zeros((259, 258), np.uint8), stream=symbol_286_stream(259 * 259)),
    "window_field_8": gray8_png(NIH, stream=zlib_header(0x88, _STREAM[1]) + _STREAM[2:]),
    "window_field_15": gray8_png(NIH, stream=zlib_header(0xF8, _STREAM[1]) + _STREAM[2:]),
    "window_field_0": gray8_png(NIH, stream=zlib_header(0x08, _STREAM[1]) + _STREAM[2:]),
    "method_7": gray8_png(NIH, stream=zlib_header(0x77, _STREAM[1]) + _STREAM[2:]),
    "bad_header_check": gray8_png(NIH, stream=bytes([_STREAM[0], _STREAM[1] ^ 1]) + _STREAM[2:]),
    "preset_dictionary": gray8_png(
        NIH, stream=zlib_header(0x78, _STREAM[1] | 0x20) + b"\x00\x00\x00\x01" + _STREAM[2:]
    ),
    "many_metadata_chunks": gray8_png(NIH, after_idat=[_TEXT] * 65),
    "many_tiny_idat": gray8_png(NIH, idat_parts=len(_STREAM)),
    "too_little_data": gray8_png(NIH, stream=zlib.compress(filtered_rows(NIH, [4] * 96)[:-81])),
    "too_much_data": gray8_png(NIH, stream=zlib.compress(filtered_rows(NIH, [4] * 96) + b"\x00" * 81)),
    "not_zlib": gray8_png(NIH, stream=b"\x00" * 64),
    "damaged_stream": gray8_png(NIH, stream=_STREAM[:40] + bytes(b ^ 0x5A for b in _STREAM[40:80]) + _STREAM[80:]),
    "filter_5": gray8_png(NIH, [4] * 50 + [5] + [4] * 45),
    "sixteen_bit": b"\x89PNG\r\n\x1a\n" + ihdr(80, 96, depth=16) + chunk(b"IDAT", zlib.compress(b"\x00" * 96 * 161)),
    "interlaced": b"\x89PNG\r\n\x1a\n"
    + ihdr(80, 96, interlace=1)
    + chunk(b"IDAT", zlib.compress(b"\x00" * 96 * 81 * 2))
    + chunk(b"IEND", b""),
}


@pytest.mark.parametrize("case", sorted(OUT_OF_SCOPE))
def test_files_outside_its_scope_are_left_to_the_general_decoder(case, monkeypatch):
    data = OUT_OF_SCOPE[case]
    assert png_gray8.decode(data) is None
    assert same_outcome(outcome(data), outcome_without_fast_path(data, monkeypatch))


def test_zlib_ngs_decompressobj_gives_the_same_outcomes(monkeypatch):
    """Where zlib-ng lacks `_ZlibDecompressor` (a private name), `decompressobj` inflates: the same result for
    every out-of-scope or damaged file and for NIH images."""
    from zlib_ng import zlib_ng

    cases = [*OUT_OF_SCOPE.values(), *(p.read_bytes() for p in cxr14_images(8))]
    fast = [png_gray8.decode(data) for data in cases]
    monkeypatch.setattr(png_gray8, "_inflater", zlib_ng.decompressobj)
    assert png_gray8._inflater is not getattr(zlib_ng, "_ZlibDecompressor", None)
    for data, expected in zip(cases, fast, strict=True):
        got = png_gray8.decode(data)
        assert (got is None) == (expected is None) and (got is None or np.array_equal(got, expected))
    assert sum(f is not None for f in fast) == 8


def test_metadata_chunks_and_split_idat_stay_on_this_path():
    data = gray8_png(
        NIH,
        idat_parts=4,
        before_idat=[chunk(b"pHYs", b"\x00\x00\x0b\x13\x00\x00\x0b\x13\x01"), _TEXT],
        after_idat=[chunk(b"tIME", b"\x07\xea\x0c\x03\x14\x00\x00")],
    )
    fast = png_gray8.decode(data)
    assert fast is not None and np.array_equal(fast, NIH) and np.array_equal(fast, opencv_decode(data))


def test_bytes_after_the_zlib_stream_are_ignored_as_libpng_does():
    data = gray8_png(NIH, stream=_STREAM + b"\x00\x01" * 500)
    fast = png_gray8.decode(data)
    assert fast is not None and np.array_equal(fast, NIH) and np.array_equal(fast, opencv_decode(data))


def test_damaged_files_are_still_refused(monkeypatch):
    for case in (
        "idat_crc",
        "damaged_stream",
        "filter_5",
        "too_little_data",
        "not_zlib",
        "incomplete_huffman_code",
        "undefined_length_symbol",
        "window_field_8",
        "bad_header_check",
        "preset_dictionary",
    ):
        kind, reason = outcome(OUT_OF_SCOPE[case])
        assert (kind, reason) == ("rejected", "IMAGE_CORRUPT"), case


def test_without_the_c_module_pngs_decode_with_opencv(monkeypatch):
    monkeypatch.setattr(png_gray8, "unfilter_into", None)
    data = cxr14_images(1)[0].read_bytes()
    assert png_gray8.decode(data) is None
    assert np.array_equal(decode_image(data).array, opencv_decode(data))


def test_unfilter_into_checks_its_buffers():
    from cxr_serving._pixels import png_unfilter_into as unfilter_into

    raw = bytes(3 * 5)
    with pytest.raises(ValueError):
        unfilter_into(raw, bytearray(12), 3, 5)  # out must be 15
    with pytest.raises(ValueError):
        unfilter_into(raw[:-1], bytearray(15), 3, 4)  # raw must be 3 * 5
    with pytest.raises(ValueError):
        unfilter_into(b"", bytearray(0), 0, 4)
    with pytest.raises(ValueError):
        unfilter_into(raw, bytearray(12), -3, 4)
    with pytest.raises(TypeError):
        unfilter_into(raw, bytes(12), 3, 4)  # read-only
    with pytest.raises(ValueError, match="row 2 has filter type 7"):
        unfilter_into(b"\x00" * 5 + b"\x04" * 5 + b"\x07" + b"\x00" * 4, bytearray(12), 3, 4)
    out = bytearray(12)
    unfilter_into(b"\x01\x01\x01\x01\x01" * 3, out, 3, 4)  # Sub: running sums along each row
    assert bytes(out) == bytes([1, 2, 3, 4]) * 3


def test_unfiltering_lets_other_threads_run():
    """The C loop runs without the GIL, so decode threads (and the event loop) run beside it."""
    from cxr_serving._pixels import png_unfilter_into as unfilter_into

    h, w = 16384, 4096
    raw = bytes(bytearray(b"\x04" + b"\x07" * w) * h)
    out = np.empty((h, w), np.uint8)
    assert_runs_without_the_gil(lambda: unfilter_into(raw, out, h, w))
