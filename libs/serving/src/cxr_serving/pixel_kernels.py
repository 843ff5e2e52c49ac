"""Whether the C image kernels (`cxr_serving._pixels`) serve this process: without them 8-bit PNGs still decode
and images still preprocess, through OpenCV and torch, at more CPU per image, so a service says so at start
and in a gauge instead of silently running slower (docs/serving-runtime.md, "C image kernels")."""

from __future__ import annotations

import logging

from cxr_serving import png_gray8, resize

REBUILD = "install libs/serving where a C compiler is present (make install; in an image, a build stage with gcc)"


def missing() -> list[str]:
    """The kernels the decoders would use but cannot, by what they do ([] when all are built)."""
    out = []
    if not png_gray8.kernel_built():
        out.append("PNG row filters")
    if not resize.kernel_built():
        out.append("one-pass resize + normalise")
    return out


def report(log: logging.Logger) -> bool:
    """Log which path images take (WARNING when a kernel is missing); True when every kernel is built."""
    absent = missing()
    if absent:
        log.warning(
            "C image kernels not built (cxr_serving._pixels): %s fall back to OpenCV / torch, at more CPU per "
            "image (JPEG and DICOM decoding are unaffected); rebuild: %s",
            ", ".join(absent),
            REBUILD,
        )
        return False
    log.info("C image kernels: built (PNG row filters, one-pass resize + normalise)")
    return True
