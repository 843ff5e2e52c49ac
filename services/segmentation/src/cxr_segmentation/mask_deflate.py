"""The zlib stream of a binary mask's PNG rows (filter byte 0, then 0/255 per pixel), written as runs.

A segmentation mask is a few runs per row, and most rows repeat the row above. zlib's level 1 still
hashes every byte, so its cost grows with the pixels; here a row equal to the one above is one copy of
distance `width + 1`, and any other row is its filter byte plus, per run, one literal and copies of
distance 1, coded with deflate's fixed Huffman table (RFC 1951, 3.2.6) and packed into bits with numpy.
The stream is a valid zlib stream that inflates to exactly the same bytes; a mask with too many runs
for this to pay (noise) returns None and the caller deflates it with zlib.
"""

from __future__ import annotations

import struct

import numpy as np

MAX_MATCH = 258
MAX_DISTANCE = 32768
_LENGTH_BASES = (3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163,
                 195, 227, 258)  # fmt: skip
_LENGTH_EXTRA = (0,) * 8 + (1,) * 4 + (2,) * 4 + (3,) * 4 + (4,) * 4 + (5,) * 4 + (0,)
_DISTANCE_BASES = (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049,
                   3073, 4097, 6145, 8193, 12289, 16385, 24577)  # fmt: skip
_DISTANCE_EXTRA = (0, 0, 0, 0, *(i // 2 for i in range(2, 28)))
_ZLIB_HEADER = b"\x78\x01"  # deflate, 32 KiB window, fastest; (0x7801 % 31 == 0)
_BLOCK_HEADER = (0b011, 3)  # BFINAL = 1, BTYPE = 01 (fixed Huffman codes)
_END_OF_BLOCK_BITS = 7  # symbol 256: seven zero bits


def _reversed(code: int, bits: int) -> int:
    """Huffman codes go into the stream most significant bit first; the stream is packed from bit 0."""
    return int(f"{code:0{bits}b}"[::-1], 2)


def _literal(symbol: int) -> tuple[int, int]:
    """(bits as packed, bit count) of a fixed-code literal/length symbol (0-287)."""
    if symbol < 144:
        return _reversed(0x30 + symbol, 8), 8
    if symbol < 256:
        return _reversed(0x190 + symbol - 144, 9), 9
    if symbol < 280:
        return _reversed(symbol - 256, 7), 7
    return _reversed(0xC0 + symbol - 280, 8), 8


def _length_table() -> tuple[np.ndarray, np.ndarray]:
    """For every match length 3-258: its length symbol's code and extra bits, packed, and their count."""
    bits = np.zeros(MAX_MATCH + 1, dtype=np.uint64)
    count = np.zeros(MAX_MATCH + 1, dtype=np.uint64)
    for length in range(3, MAX_MATCH + 1):
        i = len(_LENGTH_BASES) - 1 if length == MAX_MATCH else max(
            k for k, base in enumerate(_LENGTH_BASES[:-1]) if base <= length
        )  # fmt: skip
        code, n = _literal(257 + i)
        bits[length] = code | ((length - _LENGTH_BASES[i]) << n)
        count[length] = n + _LENGTH_EXTRA[i]
    return bits, count


def _distance(distance: int) -> tuple[int, int]:
    """(bits as packed, bit count) of a distance: its fixed 5-bit code and extra bits."""
    i = max(k for k, base in enumerate(_DISTANCE_BASES) if base <= distance)
    return _reversed(i, 5) | ((distance - _DISTANCE_BASES[i]) << 5), 5 + _DISTANCE_EXTRA[i]


_LENGTH_BITS, _LENGTH_COUNT = _length_table()
_LITERAL_0 = _literal(0)
_LITERAL_255 = _literal(255)
_DISTANCE_1 = _distance(1)


def _chunks(start: np.ndarray, total: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Copies of `total` (>= 3) bytes beginning at `start`, cut into matches of 3-258 bytes: (starts, lengths)."""
    n = (total + MAX_MATCH - 1) // MAX_MATCH
    owner = np.repeat(np.arange(total.size), n)
    k = np.arange(owner.size) - np.repeat(np.cumsum(n) - n, n)
    last_len = (total - MAX_MATCH * (n - 1))[owner]
    length = np.full(owner.size, MAX_MATCH, dtype=np.int64)
    is_last = k == n[owner] - 1
    length[is_last] = np.maximum(last_len[is_last], 3)
    short = (k == n[owner] - 2) & (last_len < 3)  # give the last match its 3 bytes from the one before
    length[short] -= 3 - last_len[short]
    offset = np.where(is_last, total[owner] - length, MAX_MATCH * k)
    return start[owner] + offset, length


def deflate_masks(masks: np.ndarray, max_tokens: int | None = None) -> list[bytes | None]:
    """The zlib stream of each C x H x W bool mask's PNG rows (filter byte 0, then 0 or 255 per pixel), all
    masks coded at once; None for a mask with more than `max_tokens` codes (default H * (W + 1) / 8) and for
    every mask of a shape this cannot code (W < 2 or W >= 32768)."""
    n_masks, h, w = masks.shape
    stride = w + 1
    if w < 2 or stride > MAX_DISTANCE or 0 in masks.shape:
        return [None] * n_masks
    size = h * stride  # bytes of one mask's rows
    m = np.ascontiguousarray(masks, dtype=bool).view(np.uint8).reshape(n_masks * h, w)
    words = m.view(np.uint64) if w % 8 == 0 else m  # rows compared 8 bytes at a time where they allow it
    repeated = np.zeros(n_masks * h, dtype=bool)
    repeated[1:] = (words[1:] == words[:-1]).all(axis=1)
    repeated[::h] = False  # a mask's first row never copies the mask before it
    literal_rows = np.flatnonzero(~repeated)
    flat = m[literal_rows].reshape(-1)
    is_start = np.empty(flat.size, dtype=bool)  # every run of the literal rows: row starts, changes of value
    np.not_equal(flat[1:], flat[:-1], out=is_start[1:])
    is_start[::w] = True
    starts = np.flatnonzero(is_start)
    run_row, run_col = np.divmod(starts, w)
    run_len = np.diff(starts, append=flat.size)
    run_on = flat[starts] != 0
    run_pos = literal_rows[run_row] * stride + 1 + run_col  # in all masks' rows, one after the other
    rest = run_len - 1  # after the run's first byte, a literal: copies of the byte before
    few = (rest > 0) & (rest < 3)
    two = rest == 2
    many = rest >= 3
    copy_rows = np.flatnonzero(repeated)
    match_pos, match_len = _chunks(run_pos[many] + 1, rest[many])
    row_pos, row_len = _chunks(copy_rows * stride, np.full(copy_rows.size, stride, dtype=np.int64))

    lit_on = np.concatenate((np.zeros(literal_rows.size, dtype=bool), run_on, run_on[few], run_on[two]))
    row_dist_bits, row_dist_count = _distance(stride)
    header = np.arange(n_masks) * (2 * size) - 1  # each mask's block header, before its first byte (positions x 2)
    pos = np.concatenate((header, 2 * np.concatenate((literal_rows * stride, run_pos, run_pos[few] + 1,
                                                      run_pos[two] + 2, match_pos, row_pos))))  # fmt: skip
    bits = np.concatenate((
        np.full(n_masks, _BLOCK_HEADER[0], dtype=np.uint64),
        np.where(lit_on, np.uint64(_LITERAL_255[0]), np.uint64(_LITERAL_0[0])),
        _LENGTH_BITS[match_len] | (np.uint64(_DISTANCE_1[0]) << _LENGTH_COUNT[match_len]),
        _LENGTH_BITS[row_len] | (np.uint64(row_dist_bits) << _LENGTH_COUNT[row_len]),
    ))  # fmt: skip
    counts = np.concatenate((
        np.full(n_masks, _BLOCK_HEADER[1], dtype=np.uint64),
        np.where(lit_on, np.uint64(_LITERAL_255[1]), np.uint64(_LITERAL_0[1])),
        _LENGTH_COUNT[match_len] + np.uint64(_DISTANCE_1[1]),
        _LENGTH_COUNT[row_len] + np.uint64(row_dist_count),
    ))  # fmt: skip
    order = np.argsort(pos, kind="stable")  # a few sorted runs: merged, not sorted
    owner = np.searchsorted(header, pos[order], side="right") - 1  # the mask each code belongs to
    tokens = np.bincount(owner, minlength=n_masks)
    streams = _pack(bits[order], counts[order], owner, n_masks)
    adlers = _adler32(h, w, repeated, literal_rows, run_row, run_col, run_len, run_on, n_masks)
    budget = max_tokens if max_tokens is not None else size // 8
    return [
        None if tokens[k] > budget else _ZLIB_HEADER + streams[k] + struct.pack(">I", adlers[k]) for k in range(n_masks)
    ]


def _pack(bits: np.ndarray, counts: np.ndarray, owner: np.ndarray, n_masks: int) -> list[bytes]:
    """Each mask's codes (at most 32 bits each, in stream order) -> its bytes, bit 0 first, with the
    end-of-block code after them; every mask starts on a 64-bit word of one shared buffer."""
    ends = np.cumsum(counts)
    first = np.searchsorted(owner, np.arange(n_masks))  # each mask's first code
    begin = np.r_[0, ends][first]  # bit where each mask's codes begin in the running sum
    total = np.r_[begin[1:], ends[-1]] - begin + _END_OF_BLOCK_BITS
    words_each = (total + 63) // 64
    base = np.r_[0, np.cumsum(words_each)[:-1]].astype(np.uint64) * np.uint64(64)
    offsets = (ends - counts) - begin[owner] + base[owner]
    word = offsets >> np.uint64(6)
    shift = offsets & np.uint64(63)
    low = bits << shift
    high = (bits >> np.uint64(1)) >> (np.uint64(63) - shift)  # the bits past the word's end (none at shift 0)
    words = np.zeros(int(words_each.sum()) + 1, dtype="<u8")
    starts = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
    used = word[starts].astype(np.int64)
    words[used] = np.bitwise_or.reduceat(low, starts)
    words[used + 1] |= np.bitwise_or.reduceat(high, starts)
    raw = words.view(np.uint8)
    return [raw[int(base[k]) // 8 : int(base[k]) // 8 + (int(total[k]) + 7) // 8].tobytes() for k in range(n_masks)]


def _adler32(h: int, w: int, repeated: np.ndarray, literal_rows: np.ndarray, run_row: np.ndarray,
             run_col: np.ndarray, run_len: np.ndarray, run_on: np.ndarray, n_masks: int) -> list[int]:  # fmt: skip
    """zlib's Adler-32 of each mask's PNG rows, from the runs: A = 1 + the byte sum, B = n + the sum of every
    byte times the count of bytes from it to the end (mod 65521)."""
    mod = 65521
    stride, n = w + 1, h * (w + 1)
    on_len = np.where(run_on, run_len, 0)
    count = np.bincount(run_row, weights=on_len, minlength=literal_rows.size).astype(np.int64)
    col_sum = np.bincount(run_row, weights=on_len * run_col + on_len * (on_len - 1) // 2, minlength=literal_rows.size)
    of_row = np.cumsum(~repeated) - 1  # each row's literal row (itself, or the one it repeats)
    count_all = count[of_row]
    first_byte = (np.arange(n_masks * h, dtype=np.int64) % h) * stride + 1
    positions = (count_all % mod) * (first_byte % mod) % mod + col_sum.astype(np.int64)[of_row] % mod
    mask_of_row = np.arange(n_masks * h) // h
    on = np.bincount(mask_of_row, weights=count_all, minlength=n_masks).astype(np.int64)
    pos_sum = np.bincount(mask_of_row, weights=positions, minlength=n_masks).astype(np.int64)
    out = []
    for k in range(n_masks):
        a = (1 + 255 * int(on[k])) % mod
        b = (n + 255 * (n * int(on[k]) - int(pos_sum[k]))) % mod
        out.append((b << 16) | a)
    return out
