"""Coverage-guided fuzzer (atheris/libFuzzer) for `cxr_serving.images.decode_image`.

Contract under test: for ANY bytes and content type, the decoder either raises
`ImageRejectedError` (the caller gets INVALID_ARGUMENT) or returns one finite float32
grayscale frame in [0, 1] within the pixel cap. Anything else is a finding: libFuzzer stops,
prints the traceback and writes the input to `<artifact_prefix>crash-<sha1>`.

Run it directly with libFuzzer flags (`python fuzz/fuzz_decode_image.py -max_total_time=60 CORPUS_DIR`)
or through `python -m fuzz.run`, which seeds the corpus and writes a JSON summary.

Long campaigns set CXR_FUZZ_FINDINGS_DIR: each distinct failure (exception type and the line that
raised it) is written there as `<Type>-<sha1>.bin` plus a `.txt` traceback, and fuzzing goes on
instead of stopping at the first one.
"""

from __future__ import annotations

import hashlib
import os
import sys
import traceback
import warnings
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["cxr_serving", "pydicom", "PIL"]):
    # what decode_image imports lazily, imported here so that it is instrumented too
    import numpy as np
    import PIL.Image
    import PIL.JpegImagePlugin
    import PIL.PngImagePlugin  # noqa: F401
    import pydicom
    import pydicom.pixels
    import pydicom.pixels.decoders.pylibjpeg
    import pydicom.pixels.decoders.rle  # noqa: F401

    from cxr_serving import png_gray8
    from cxr_serving.errors import ImageRejectedError
    from cxr_serving.images import DecodeLimits, decode_image

import cv2

FINDINGS_DIR = os.environ.get("CXR_FUZZ_FINDINGS_DIR")
_seen: set[tuple[str, str, int]] = set()

# A 5 MP cap (a large radiograph is ~3000x3000/9 MP... the seeds stay under it) keeps each input
# fast and the fuzzer's memory flat; the code paths are the same as with the production cap.
LIMITS = DecodeLimits(max_pixels=5_000_000)
CONTENT_TYPES = ("", "image/png", "image/jpeg", "application/dicom", "text/plain", "image/jpg; q=1")


def check(data: bytes) -> None:
    # The 8-bit grayscale PNG fast path: whatever it decodes, OpenCV decodes to the same bytes.
    if len(data) <= 4_000_000 and (fast := png_gray8.decode(data)) is not None:
        reference = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if reference is None or reference.shape != fast.shape or not np.array_equal(reference, fast):
            raise AssertionError("png_gray8 decoded a file OpenCV refuses or decodes otherwise")
    # Most inputs go without a content type (so mutations reach the decoders); every 16th
    # length picks one, mismatched or not, to exercise the content-type checks too.
    ctype = CONTENT_TYPES[(len(data) // 16) % len(CONTENT_TYPES)] if len(data) % 16 == 0 else ""
    try:
        img = decode_image(data, ctype, LIMITS)
    except ImageRejectedError as exc:
        if not exc.message or not exc.reason:
            raise AssertionError("refusal without a message or reason") from None
        return
    p = img.pixels
    if not (isinstance(p, np.ndarray) and p.dtype == np.float32 and p.ndim == 2):
        raise AssertionError(
            f"decoded pixels are {type(p).__name__} {getattr(p, 'dtype', '')} {getattr(p, 'shape', '')}"
        )
    if min(p.shape) < LIMITS.min_side or p.size > LIMITS.max_pixels:
        raise AssertionError(f"decoded shape {p.shape} outside the limits")
    if not np.isfinite(p).all():
        raise AssertionError("decoded pixels are not finite")
    if p.min() < 0.0 or p.max() > 1.0:
        raise AssertionError(f"decoded pixels outside [0, 1]: {p.min()}..{p.max()}")


def keep_going(data: bytes) -> None:
    """`check`, recording each distinct failure under FINDINGS_DIR instead of stopping."""
    try:
        check(data)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a finding: any failure of the contract, whatever its type
        last = traceback.extract_tb(exc.__traceback__)[-1]
        key = (type(exc).__name__, last.filename, last.lineno or 0)
        if key in _seen:
            return
        _seen.add(key)
        out = Path(FINDINGS_DIR or ".")
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{key[0]}-{hashlib.sha256(data).hexdigest()[:40]}"
        (out / f"{stem}.bin").write_bytes(data)
        (out / f"{stem}.txt").write_text("".join(traceback.format_exception(exc)))


def main() -> None:
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    atheris.Setup(sys.argv, keep_going if FINDINGS_DIR else check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
