"""One decoder for PNG (8/16-bit), JPEG and DICOM, with validation before any decode.

Order of checks (each refusal is an `ImageRejectedError` with an actionable message):
byte size -> magic bytes -> declared content type -> allowed formats -> the input policy on the
declared dimensions (minimum side, aspect ratio, pixel count; read from the header, before pixels
are decoded) -> decode -> grayscale. Every image service applies this one policy.

Only the exceptions each library documents for bad data become IMAGE_CORRUPT; anything else is a
bug and propagates, so the caller sees INTERNAL (with a correlation id) and the fuzzer sees a crash.

The result is a grayscale image where 1 is white as a radiologist sees it: DICOM (read in
`cxr_serving.dicom`) goes through the modality LUT, the VOI LUT or window, then MONOCHROME1 inversion.
An 8-bit grayscale source that no LUT changes stays uint8 (`DecodedImage.array`, value / 255), so
preprocessing reads a quarter of the bytes and scales after resizing; `DecodedImage.pixels` is always
the float32 image in [0, 1]. 8-bit grayscale PNGs decode with `png_gray8` (zlib-ng inflate, row filters
in C) where it takes the file, else with OpenCV; grayscale JPEGs with simplejpeg (libjpeg-turbo,
strict): Pillow's pixels, for less CPU; other modes go through Pillow.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import simplejpeg
from PIL import Image as PILImage

from cxr_serving import png_gray8
from cxr_serving.errors import ImageRejectedError
from cxr_serving.handoff import WarmThreadPool, run_on

if TYPE_CHECKING:
    from cxr_serving.settings import Settings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"

CONTENT_TYPES: dict[str, str] = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "application/dicom": "dcm",
    "image/dicom": "dcm",
}
# Config spells formats as file extensions ("jpg", "jpeg", "png", "dcm").
_FORMAT_ALIASES = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "dcm": "dcm", "dicom": "dcm"}


# The input policy's defaults (security.min_image_side / max_image_aspect_ratio): no chest
# radiograph is smaller than this on a side, or longer than this on one side than on the other.
DEFAULT_MIN_IMAGE_SIDE = 64
DEFAULT_MAX_ASPECT_RATIO = 4.0


@dataclass(frozen=True)
class DecodeLimits:
    """The input policy every image service applies; built from `security` settings."""

    allowed_formats: frozenset[str] = frozenset({"png", "jpeg", "dcm"})
    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 50_000_000
    min_side: int = DEFAULT_MIN_IMAGE_SIDE
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
    anonymize_dicom: bool = False  # strip identifying DICOM attributes right after reading

    @classmethod
    def from_settings(
        cls,
        allowed_image_formats: Sequence[str],
        max_image_size_mb: float,
        max_image_pixels: int,
        *,
        min_image_side: int = DEFAULT_MIN_IMAGE_SIDE,
        max_image_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
        anonymize_dicom: bool = False,
    ) -> DecodeLimits:
        return cls(
            allowed_formats=frozenset(_FORMAT_ALIASES[f.lower()] for f in allowed_image_formats),
            max_bytes=int(max_image_size_mb * 1024 * 1024),
            max_pixels=max_image_pixels,
            min_side=min_image_side,
            max_aspect_ratio=max_image_aspect_ratio,
            anonymize_dicom=anonymize_dicom,
        )


# Where DecodedImage.pixel_spacing_mm comes from (the SpacingSource enum of the API, lower case, no prefix).
SPACING_NONE = "none"
SPACING_PIXEL = "pixel_spacing"  # PixelSpacing: in the patient
SPACING_IMAGER_CORRECTED = "imager_pixel_spacing_corrected"  # ImagerPixelSpacing / magnification factor
SPACING_IMAGER_UNCORRECTED = "imager_pixel_spacing_uncorrected"  # ImagerPixelSpacing: at the detector


UNIT_8BIT = np.float32(1.0 / 255.0)  # uint8 sample -> [0, 1]


@dataclass
class DecodedImage:
    """Grayscale samples (H x W: uint8 for value / 255, or float32 in [0, 1]) and what we learned on the way."""

    array: np.ndarray
    format: str
    bits_stored: int
    pixel_spacing_mm: tuple[float, float] | None = None  # (row, column), in the patient when the source allows
    photometric_interpretation: str = ""
    dataset: Any = field(default=None, repr=False)  # pydicom Dataset for DICOM input (for DICOM-SEG export)
    pixel_spacing_source: str = SPACING_NONE  # which attribute pixel_spacing_mm comes from (SPACING_*)
    magnification_factor: float = 0.0  # the EstimatedRadiographicMagnificationFactor applied, else 0
    _unit: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def pixels(self) -> np.ndarray:
        """The image as float32 in [0, 1] (made once, on first use, from a uint8 `array`)."""
        if self._unit is None:
            self._unit = self.array if self.array.dtype == np.float32 else unit_float(self.array)
        return self._unit

    @property
    def height(self) -> int:
        return int(self.array.shape[0])

    @property
    def width(self) -> int:
        return int(self.array.shape[1])


def unit_float(gray8: np.ndarray) -> np.ndarray:
    """uint8 grayscale -> float32 in [0, 1], as every 8-bit path computes it."""
    return gray8.astype(np.float32) * UNIT_8BIT


def sniff_format(data: bytes) -> str | None:
    """'png', 'jpeg', 'dcm' from the magic bytes, or None."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if len(data) >= DICOM_MAGIC_OFFSET + 4 and data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC:
        return "dcm"
    return None


def validate_image_bytes(data: bytes, content_type: str, limits: DecodeLimits) -> str:
    """Cheap checks before decoding; returns the detected format."""
    if not data:
        raise ImageRejectedError("image is empty: send the encoded file bytes in image.data", reason="IMAGE_EMPTY")
    if len(data) > limits.max_bytes:
        raise ImageRejectedError(
            f"image is {len(data) / 1048576:.1f} MB; the limit is {limits.max_bytes / 1048576:.1f} MB "
            "(security.max_image_size_mb)",
            reason="IMAGE_TOO_LARGE",
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRejectedError(
            "unrecognised image format: expected PNG, JPEG or DICOM Part 10 (with the 128-byte preamble and 'DICM')",
            reason="IMAGE_FORMAT_UNKNOWN",
        )
    ctype = content_type.strip().lower().split(";")[0]
    if ctype:
        declared = CONTENT_TYPES.get(ctype)
        if declared is None:
            raise ImageRejectedError(
                f"content type '{content_type}' is not supported; use one of {sorted(CONTENT_TYPES)} or leave it empty",
                reason="CONTENT_TYPE_UNSUPPORTED",
            )
        if declared != fmt:
            raise ImageRejectedError(
                f"content type '{content_type}' does not match the bytes, which are {fmt.upper()}",
                reason="CONTENT_TYPE_MISMATCH",
            )
    if fmt not in limits.allowed_formats:
        raise ImageRejectedError(
            f"{fmt.upper()} images are not allowed here "
            f"(security.allowed_image_formats: {sorted(limits.allowed_formats)})",
            reason="IMAGE_FORMAT_NOT_ALLOWED",
        )
    return fmt


def check_dimensions(width: int, height: int, frames: int, limits: DecodeLimits) -> None:
    """The input policy on the declared size: minimum side, aspect ratio, pixel cap."""
    if width < limits.min_side or height < limits.min_side:
        raise ImageRejectedError(
            f"image is {width}x{height}; a chest radiograph needs at least {limits.min_side} pixels on each side "
            "(security.min_image_side)",
            reason="IMAGE_TOO_SMALL",
        )
    ratio = max(width, height) / max(min(width, height), 1)
    if ratio > limits.max_aspect_ratio:
        raise ImageRejectedError(
            f"image is {width}x{height} (aspect ratio {ratio:.1f}); chest radiographs are at most "
            f"{limits.max_aspect_ratio:g}:1 (security.max_image_aspect_ratio)",
            reason="IMAGE_ASPECT_RATIO",
        )
    if width * height * max(frames, 1) > limits.max_pixels:
        raise ImageRejectedError(
            f"image declares {width}x{height}x{max(frames, 1)} pixels, over the cap of {limits.max_pixels} "
            "(security.max_image_pixels)",
            reason="IMAGE_TOO_MANY_PIXELS",
        )


# What Pillow raises for bad data, and only that: UnidentifiedImageError (an OSError) when no
# plugin accepts the bytes; OSError for truncated or undecodable pixel data ("image file is
# truncated", "broken data stream", a codec's error code); SyntaxError when a plugin meets a broken
# chunk or marker (PNG CRC, bad JPEG marker) while loading; EOFError when a PNG's chunks end early;
# ValueError for PNG text/profile chunks that decompress too large and for out-of-range tile extents.
_PIL_DATA_ERRORS: tuple[type[Exception], ...] = (OSError, SyntaxError, EOFError, ValueError)


def _corrupt(fmt: str, exc: BaseException) -> ImageRejectedError:
    return ImageRejectedError(
        f"{fmt.upper()} could not be decoded ({type(exc).__name__}: {str(exc)[:200]})", reason="IMAGE_CORRUPT"
    )


def _is_rust_panic(exc: BaseException) -> bool:
    """pyo3 decoders (pylibjpeg-rle) raise pyo3_runtime.PanicException, a BaseException, on some corrupt frames."""
    return type(exc).__name__ == "PanicException" and type(exc).__module__ == "pyo3_runtime"


@contextmanager
def bad_data(fmt: str, errors: tuple[type[Exception], ...]) -> Iterator[None]:
    """Inside: the library's own bad-data exceptions become IMAGE_CORRUPT; anything else propagates."""
    try:
        yield
    except ImageRejectedError:
        raise
    except errors as exc:
        raise _corrupt(fmt, exc) from None
    except BaseException as exc:
        if _is_rust_panic(exc):
            raise _corrupt(fmt, exc) from None
        raise


def decode_image(data: bytes, content_type: str = "", limits: DecodeLimits | None = None) -> DecodedImage:
    """Validate and decode one image. Raises ImageRejectedError for anything unusable; any other
    exception is a defect (ours, or a library failing in an undocumented way) and propagates."""
    limits = limits or DecodeLimits()
    fmt = validate_image_bytes(data, content_type, limits)
    from cxr_serving.dicom import decode_dicom  # dicom.py builds on this module's types

    try:
        decoded = decode_dicom(data, limits) if fmt == "dcm" else _decode_raster(data, fmt, limits)
    except (MemoryError, PILImage.DecompressionBombError):  # a hostile header the pixel cap did not catch
        raise ImageRejectedError("image is too large to decode", reason="IMAGE_TOO_MANY_PIXELS") from None
    shape = decoded.array.shape
    if len(shape) != 2 or min(shape) < limits.min_side:  # header and pixel data disagree
        raise ImageRejectedError(
            f"{fmt.upper()} pixel data has shape {shape}, not a single grayscale frame of at least "
            f"{limits.min_side}x{limits.min_side} (check Rows/Columns/SamplesPerPixel/BitsAllocated)",
            reason="IMAGE_CORRUPT",
        )
    check_dimensions(shape[1], shape[0], 1, limits)
    if decoded.array.dtype != np.uint8 and not np.isfinite(decoded.array).all():  # e.g. a WindowWidth of NaN
        raise ImageRejectedError(
            f"{fmt.upper()} decodes to non-finite pixel values: check RescaleSlope/RescaleIntercept and "
            "WindowCenter/WindowWidth",
            reason="IMAGE_CORRUPT",
        )
    return decoded


def _decode_raster(data: bytes, fmt: str, limits: DecodeLimits) -> DecodedImage:
    with warnings.catch_warnings(), bad_data(fmt, _PIL_DATA_ERRORS):
        warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
        img = PILImage.open(io.BytesIO(data))
        check_dimensions(img.width, img.height, getattr(img, "n_frames", 1), limits)
        if (fmt == "png" and img.format != "PNG") or (fmt == "jpeg" and img.format != "JPEG"):
            raise ImageRejectedError(
                f"bytes look like {fmt.upper()} but decode as {img.format}", reason="IMAGE_CORRUPT"
            )
        if img.mode == "L":
            return DecodedImage(_decode_gray8(data, fmt, (img.height, img.width)), fmt, 8)
        img.load()
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img)
        if mode == "I" and arr.max(initial=0) <= 255 and img.info.get("bitdepth", 16) == 8:
            bits = 8
        else:
            bits = 16
        pixels = arr.astype(np.float32) / float(2**bits - 1)
        return DecodedImage(np.clip(pixels, 0.0, 1.0), fmt, bits)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        return DecodedImage((arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr), fmt, 32)
    converted: PILImage.Image = img
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        converted = img.convert("RGBA").convert("RGB")
    gray = converted.convert("L") if converted.mode != "L" else converted
    return DecodedImage(np.array(gray), fmt, 8)  # a writable copy: torch.from_numpy warns on Pillow's view


def decode_gray_jpeg(data: bytes) -> np.ndarray:
    """A single-component JPEG -> H x W uint8, libjpeg-turbo's islow IDCT as Pillow's; a warning (a
    truncated or damaged stream) raises ValueError, where Pillow raises OSError."""
    return np.asarray(
        simplejpeg.decode_jpeg(data, colorspace="GRAY", fastdct=False, fastupsample=False, strict=True)[..., 0]
    )


def _decode_gray8(data: bytes, fmt: str, shape: tuple[int, int]) -> np.ndarray:
    """An 8-bit grayscale PNG or JPEG (Pillow mode L, header already checked) -> H x W uint8."""
    if fmt == "jpeg":
        gray = decode_gray_jpeg(data)
    elif (fast := png_gray8.decode(data)) is not None:
        gray = fast
    else:
        import cv2

        try:
            decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        except cv2.error as exc:
            raise _corrupt(fmt, exc) from None
        if decoded is None:  # libpng refused the data (CRC, truncation, bad filter)
            raise ImageRejectedError(f"{fmt.upper()} pixel data could not be decoded", reason="IMAGE_CORRUPT")
        gray = decoded
    if gray.dtype != np.uint8 or gray.shape != shape:
        raise ImageRejectedError(
            f"{fmt.upper()} decodes to {gray.shape} {gray.dtype}, not the 8-bit {shape[1]}x{shape[0]} its header "
            "declares",
            reason="IMAGE_CORRUPT",
        )
    return gray if gray.flags.writeable and gray.flags.c_contiguous else np.array(gray, order="C")


class DecodePool:
    """Decodes and preprocesses off the event loop on `server_config.num_workers` threads."""

    def __init__(self, limits: DecodeLimits, workers: int = 4) -> None:
        self.limits = limits
        self._pool = WarmThreadPool(workers, thread_name_prefix="decode")

    @classmethod
    def from_settings(cls, settings: Settings) -> DecodePool:
        """`security`'s input policy, `server_config.num_workers` threads."""
        sec = settings.security
        limits = DecodeLimits.from_settings(
            sec.allowed_image_formats,
            sec.max_image_size_mb,
            sec.max_image_pixels,
            min_image_side=sec.min_image_side,
            max_image_aspect_ratio=sec.max_image_aspect_ratio,
            anonymize_dicom=sec.anonymize_dicom,
        )
        return cls(limits, settings.server_config.num_workers)

    async def decode(self, data: bytes, content_type: str = "") -> DecodedImage:
        return await run_on(self._pool, decode_image, data, content_type, self.limits)

    async def run(self, fn: Any, *args: Any) -> Any:
        """Run any CPU-bound step (preprocessing, mask encoding) on the same pool."""
        return await run_on(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
