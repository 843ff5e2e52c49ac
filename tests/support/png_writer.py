"""A PNG writer for tests that chooses each row's filter and each chunk, which Pillow and OpenCV do not let a
caller do: 8-bit grayscale images filtered as the PNG specification defines, chunks with correct CRCs unless
told otherwise."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence

import cv2
import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, body: bytes, *, crc: int | None = None) -> bytes:
    value = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", value)


def ihdr(width: int, height: int, depth: int = 8, color: int = 0, interlace: int = 0) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace))


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filtered_rows(image: np.ndarray, filters: Sequence[int]) -> bytes:
    """The uncompressed IDAT stream: each row's filter byte, then the row filtered with it (5+ written as given)."""
    height, width = image.shape
    prev = np.zeros(width, dtype=np.int32)
    out = bytearray()
    for y in range(height):
        row = image[y].astype(np.int32)
        a = np.concatenate([[0], row[:-1]])
        c = np.concatenate([[0], prev[:-1]])
        predictors = {0: 0, 1: a, 2: prev, 3: (a + prev) // 2, 4: _paeth(a, prev, c)}
        f = filters[y]
        out.append(f)
        out += ((row - predictors.get(f, 0)) % 256).astype(np.uint8).tobytes()
        prev = row
    return bytes(out)


def gray8_png(
    image: np.ndarray,
    filters: Sequence[int] | None = None,
    *,
    idat_parts: int = 1,
    before_idat: Sequence[bytes] = (),
    between_idat: Sequence[bytes] = (),
    after_idat: Sequence[bytes] = (),
    stream: bytes | None = None,
    end: bool = True,
) -> bytes:
    """An 8-bit grayscale PNG of `image` (H x W uint8), rows filtered with `filters` (Paeth by default), the
    zlib stream (or `stream`) cut into `idat_parts` IDAT chunks with `between_idat` after the first."""
    height, width = image.shape
    data = zlib.compress(filtered_rows(image, filters or [4] * height), 6) if stream is None else stream
    step = max(1, -(-len(data) // idat_parts))
    parts = [chunk(b"IDAT", data[i : i + step]) for i in range(0, len(data), step)] or [chunk(b"IDAT", b"")]
    idat = parts[0] + b"".join(between_idat) + b"".join(parts[1:])
    tail = chunk(b"IEND", b"") if end else b""
    return SIGNATURE + ihdr(width, height) + b"".join(before_idat) + idat + b"".join(after_idat) + tail


def zlib_header(cmf: int, flg: int) -> bytes:
    """CMF and FLG with FCHECK set so that the pair is a multiple of 31, as RFC 1950 requires."""
    flg &= 0xE0
    return bytes([cmf, flg | (31 - ((cmf << 8) | flg) % 31) % 31])


def incomplete_code_stream(raw: bytes) -> bytes:
    """A zlib stream of `raw` in one dynamic deflate block whose literal/length code is incomplete: every
    symbol used (its distinct bytes and end-of-block) gets an 8-bit code, the rest none. The Adler-32 is right;
    zlib refuses the stream ("invalid literal/lengths set"), a lenient inflater decodes it."""
    bits: list[int] = []

    def put(value: int, n: int) -> None:  # LSB first, as deflate packs header fields
        bits.extend((value >> i) & 1 for i in range(n))

    def code(value: int, n: int) -> None:  # Huffman codes go MSB first
        bits.extend((value >> i) & 1 for i in range(n - 1, -1, -1))

    used = sorted({*raw, 256})
    assert 2 <= len(used) < 256, "the code must stay incomplete: fewer than 256 symbols of 8 bits"
    put(1, 1)  # final block
    put(2, 2)  # dynamic Huffman codes
    put(0, 5)  # HLIT: 257 literal/length codes
    put(0, 5)  # HDIST: 1 distance code
    put(1, 4)  # HCLEN: 5 code-length codes (16, 17, 18, 0, 8)
    for length in (0, 0, 0, 1, 1):  # code-length alphabet: symbol 0 -> "0", symbol 8 -> "1"
        put(length, 3)
    for symbol in range(257):
        code(1 if symbol in used else 0, 1)
    code(0, 1)  # the one distance code: unused
    index = {s: i for i, s in enumerate(used)}
    for b in raw:
        code(index[b], 8)
    code(index[256], 8)
    bits.extend([0] * (-len(bits) % 8))
    body = bytes(sum(bits[i + j] << j for j in range(8)) for i in range(0, len(bits), 8))
    return zlib_header(0x78, 0x01) + body + zlib.adler32(raw).to_bytes(4, "big")


def symbol_286_stream(zeros: int) -> bytes:
    """A zlib stream of `zeros` zero bytes (1 + a multiple of 258) in one fixed-code deflate block: a literal 0,
    then matches coded with the literal/length symbol 286, which deflate leaves undefined (zlib refuses it:
    "invalid literal/length code"; libdeflate reads it as length 258), each at distance 1. Adler-32 right."""
    assert zeros >= 1 and (zeros - 1) % 258 == 0
    bits: list[int] = [1, 1, 0]  # final block; BTYPE 01 (fixed codes), LSB first

    def code(value: int, n: int) -> None:
        bits.extend((value >> i) & 1 for i in range(n - 1, -1, -1))

    code(0b00110000, 8)  # literal 0
    for _ in range((zeros - 1) // 258):
        code(0b11000000 + (286 - 280), 8)  # symbol 286
        code(0, 5)  # distance code 0: distance 1
    code(0, 7)  # end of block (256)
    bits.extend([0] * (-len(bits) % 8))
    body = bytes(sum(bits[i + j] << j for j in range(8)) for i in range(0, len(bits), 8))
    return zlib_header(0x78, 0x01) + body + zlib.adler32(bytes(zeros)).to_bytes(4, "big")


def random_filter_mixes(height: int, widths: Sequence[int]) -> Iterator[tuple[int, int, bytes]]:
    """(width, trial, PNG) for each width, six trials: streams of arbitrary bytes, half drawn from the extremes
    where 8-bit Paeth could overflow, each row's filter type drawn at random with one of three mixes."""
    rng = np.random.default_rng(height)
    for width in widths:
        for trial in range(6):
            values = [0, 1, 2, 127, 128, 129, 253, 254, 255] if trial % 2 else list(range(256))
            raw = bytearray(rng.choice(values, height * (width + 1)).astype(np.uint8).tobytes())
            weights = [[0.2] * 5, [0.05, 0.05, 0.05, 0.05, 0.8], [0.3, 0.3, 0.3, 0.05, 0.05]][trial % 3]
            raw[:: width + 1] = rng.choice(5, height, p=weights).astype(np.uint8).tobytes()
            yield width, trial, gray8_png(np.zeros((height, width), np.uint8), stream=zlib.compress(bytes(raw)))


def opencv_decode(data: bytes) -> np.ndarray | None:
    """The reference the fast PNG paths are checked against: OpenCV's samples, unchanged."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
