"""A fast decoder for the common chest X-ray PNG: 8-bit grayscale, not interlaced, nothing that changes samples.

Why: libpng spends most of such a decode undoing the Paeth filter one byte at a time, and zlib's
inflate is slower than zlib-ng's. This path inflates with zlib-ng (`zlib_ng`), whose inflate keeps
zlib's checks (ISA-L and libdeflate decode some streams zlib refuses, incomplete or unused-bit
Huffman codes and symbols 286-287 or 30-31 among them, so they are not used here), and undoes the
row filters in C (`_pixels`); the samples are the PNG specification's, the same bytes OpenCV
returns. It takes only files it fully understands: every chunk's CRC checks, the IHDR is 8-bit
grayscale without interlacing, the IDAT chunks are consecutive, their zlib header declares deflate
with a 32 KiB window and no dictionary, and they inflate to exactly the image; IEND is present, and
every other chunk is metadata that no decoder applies to the samples. Bytes after the zlib stream
are ignored, as libpng does (with a warning). For anything else `decode` returns None and the
caller's general decoder (OpenCV, then Pillow) decides, so its errors and its handling of unusual
files are unchanged.
"""

from __future__ import annotations

import struct

import numpy as np
from zlib_ng import zlib_ng

try:  # optional: without it, 8-bit grayscale PNGs take the general decoder
    from cxr_serving._pixels import png_unfilter_into as unfilter_into
except ImportError:  # pragma: no cover - a build without a C compiler
    unfilter_into = None

# zlib_ng's counterpart of CPython's zlib._ZlibDecompressor: bounded by max_length like a decompressobj, without
# its growing output buffer. Its name is private, so a zlib-ng without it takes decompressobj (the same results).
_inflater = getattr(zlib_ng, "_ZlibDecompressor", None) or zlib_ng.decompressobj


def kernel_built() -> bool:
    """Whether the C row filters serve (else every PNG takes the general decoder)."""
    return unfilter_into is not None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Ancillary chunks that carry only metadata: no decoder changes samples because of them.
METADATA_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt", b"tIME", b"pHYs"})
_CHUNK_HEAD = struct.Struct(">I4s")
MAX_OTHER_CHUNKS = 64  # more than this many metadata chunks: the general decoder's (this loop holds the GIL)
MIN_MEAN_IDAT_BYTES = 4096  # IDAT chunks smaller than this on average: likewise
_IHDR = struct.Struct(">IIBBBBB")


def decode(data: bytes) -> np.ndarray | None:
    """H x W uint8 samples of an 8-bit grayscale PNG, or None when the file is outside this path's scope
    or not well formed (the general decoder then decides what it is)."""
    if unfilter_into is None or not data.startswith(PNG_SIGNATURE):
        return None
    view = memoryview(data)
    pos, end = len(PNG_SIGNATURE), len(data)
    shape: tuple[int, int] | None = None
    idat: list[memoryview] = []
    idat_done = False
    others = 0
    while True:
        if pos + 12 > end:
            return None  # no IEND
        length, kind = _CHUNK_HEAD.unpack_from(data, pos)
        body_end = pos + 8 + length
        if length > 0x7FFFFFFF or body_end + 4 > end:
            return None
        crc = int.from_bytes(view[body_end : body_end + 4], "big")
        if zlib_ng.crc32(view[pos + 4 : body_end]) != crc:
            return None
        body = view[pos + 8 : body_end]
        pos = body_end + 4
        if shape is None:  # the first chunk must be IHDR
            if kind != b"IHDR" or length != _IHDR.size:
                return None
            width, height, depth, color, compression, filter_method, interlace = _IHDR.unpack(body)
            if (depth, color, compression, filter_method, interlace) != (8, 0, 0, 0, 0) or not width or not height:
                return None
            shape = (height, width)
        elif kind == b"IDAT":
            if idat_done or len(idat) > 16 + end // MIN_MEAN_IDAT_BYTES:
                return None  # IDAT chunks must be consecutive; thousands of tiny ones: not this path's
            idat.append(body)
        elif kind == b"IEND":
            break
        elif kind in METADATA_CHUNKS and others < MAX_OTHER_CHUNKS:
            others += 1
            idat_done = bool(idat)
        else:
            return None  # PLTE, tRNS, gAMA, sBIT, an unknown chunk, a second IHDR: the general decoder's call
    if not idat:
        return None
    height, width = shape
    expected = height * (width + 1)
    stream = b"".join(idat)
    if len(stream) < 2 or stream[0] != 0x78 or (stream[0] << 8 | stream[1]) % 31 or stream[1] & 0x20:
        return None  # not deflate with a 32 KiB window, a bad check, or a preset dictionary
    inflater = _inflater()
    try:
        raw = inflater.decompress(stream, expected + 1)
    except zlib_ng.error:  # type: ignore[misc]  # zlib_ng ships no annotations for its error class
        return None  # a damaged or malformed stream
    if len(raw) != expected or not inflater.eof:
        return None  # too little or too much image data
    out = np.empty(shape, dtype=np.uint8)
    try:
        unfilter_into(raw, out, height, width)
    except ValueError:
        return None  # a filter type above 4
    return out
