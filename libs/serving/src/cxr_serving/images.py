"""One decoder for PNG (8/16-bit), JPEG and DICOM, with validation before any decode.

Order of checks (each refusal is an `ImageRejectedError` with an actionable message):
byte size -> magic bytes -> declared content type -> allowed formats -> the input policy on the
declared dimensions (minimum side, aspect ratio, pixel count; read from the header, before pixels
are decoded) -> decode -> grayscale. Every image service applies this one policy.

Only the exceptions each library documents for bad data become IMAGE_CORRUPT; anything else is a
bug and propagates, so the caller sees INTERNAL (with a correlation id) and the fuzzer sees a crash.

The result is a float32 grayscale array in [0, 1] where 1 is white as a radiologist sees
it: DICOM goes through the modality LUT (rescale slope/intercept), then the VOI LUT or
window, then MONOCHROME1 inversion. Model preprocessing starts from this array.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image as PILImage

from cxr_serving.errors import ImageRejectedError
from cxr_serving.handoff import run_on

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


# Attributes that identify the patient, the people involved or the institution (removed when
# `security.anonymize_dicom` is on); sex and age are kept (not identifying on their own, and
# clinically relevant). PatientName/PatientID are replaced rather than removed: DICOM-SEG needs them.
IDENTIFYING_DICOM_KEYWORDS: tuple[str, ...] = (
    "PatientBirthDate",
    "PatientBirthTime",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "MedicalRecordLocator",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "OperatorsName",
    "RequestingPhysician",
    "AccessionNumber",
    "StudyID",
    "StationName",
    "DeviceSerialNumber",
)
ANONYMIZED = "ANONYMIZED"


def anonymize_dataset(ds: Any) -> None:
    """Remove identifying attributes and all private tags from a pydicom Dataset, in place."""
    for keyword in IDENTIFYING_DICOM_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    ds.remove_private_tags()
    ds.PatientName = ANONYMIZED
    ds.PatientID = ANONYMIZED


# Where DecodedImage.pixel_spacing_mm comes from (the SpacingSource enum of the API, lower case, no prefix).
SPACING_NONE = "none"
SPACING_PIXEL = "pixel_spacing"  # PixelSpacing: in the patient
SPACING_IMAGER_CORRECTED = "imager_pixel_spacing_corrected"  # ImagerPixelSpacing / magnification factor
SPACING_IMAGER_UNCORRECTED = "imager_pixel_spacing_uncorrected"  # ImagerPixelSpacing: at the detector


@dataclass
class DecodedImage:
    """Grayscale pixels in [0, 1] (float32, H x W) and what we learned on the way."""

    pixels: np.ndarray
    format: str
    bits_stored: int
    pixel_spacing_mm: tuple[float, float] | None = None  # (row, column), in the patient when the source allows
    photometric_interpretation: str = ""
    dataset: Any = field(default=None, repr=False)  # pydicom Dataset for DICOM input (for DICOM-SEG export)
    pixel_spacing_source: str = SPACING_NONE  # which attribute pixel_spacing_mm comes from (SPACING_*)
    magnification_factor: float = 0.0  # the EstimatedRadiographicMagnificationFactor applied, else 0

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


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


def _check_dimensions(width: int, height: int, frames: int, limits: DecodeLimits) -> None:
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


def _dicom_data_errors() -> tuple[type[Exception], ...]:
    """What pydicom and its pixel plugins raise for bad data, and only that:
    - InvalidDicomError: no DICM, a broken preamble or file meta group;
    - EOFError, OSError ("No tag to read at file position"), struct.error: an element runs past the end;
    - BytesLengthException: a binary value's length is not a multiple of its VR's size;
    - ValueError: value conversion (IS/DS/UI text, binary values of the wrong length) and the pixel
      handlers (pixel data length not matching Rows x Columns x frames, BitsAllocated or
      PixelRepresentation out of range, a LUT that does not fit);
    - NotImplementedError: a transfer syntax or photometric interpretation no installed plugin decodes;
    - RuntimeError: every plugin failed on a compressed frame (openjpeg/libjpeg/RLE codec errors);
    - zlib.error: deflated transfer syntaxes."""
    from pydicom.errors import BytesLengthException, InvalidDicomError

    return (
        InvalidDicomError,
        BytesLengthException,
        EOFError,
        OSError,
        struct.error,
        ValueError,
        NotImplementedError,
        RuntimeError,
        zlib.error,
    )


def _corrupt(fmt: str, exc: BaseException) -> ImageRejectedError:
    return ImageRejectedError(
        f"{fmt.upper()} could not be decoded ({type(exc).__name__}: {str(exc)[:200]})", reason="IMAGE_CORRUPT"
    )


def _is_rust_panic(exc: BaseException) -> bool:
    """pyo3 decoders (pylibjpeg-rle) raise pyo3_runtime.PanicException, a BaseException, on some corrupt frames."""
    return type(exc).__name__ == "PanicException" and type(exc).__module__ == "pyo3_runtime"


@contextmanager
def _bad_data(fmt: str, errors: tuple[type[Exception], ...]) -> Iterator[None]:
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
    try:
        decoded = _decode_dicom(data, limits) if fmt == "dcm" else _decode_raster(data, fmt, limits)
    except (MemoryError, PILImage.DecompressionBombError):  # a hostile header the pixel cap did not catch
        raise ImageRejectedError("image is too large to decode", reason="IMAGE_TOO_MANY_PIXELS") from None
    shape = decoded.pixels.shape
    if len(shape) != 2 or min(shape) < limits.min_side:  # header and pixel data disagree
        raise ImageRejectedError(
            f"{fmt.upper()} pixel data has shape {shape}, not a single grayscale frame of at least "
            f"{limits.min_side}x{limits.min_side} (check Rows/Columns/SamplesPerPixel/BitsAllocated)",
            reason="IMAGE_CORRUPT",
        )
    _check_dimensions(shape[1], shape[0], 1, limits)
    if not np.isfinite(decoded.pixels).all():  # e.g. DICOM WindowWidth or RescaleSlope of NaN
        raise ImageRejectedError(
            f"{fmt.upper()} decodes to non-finite pixel values: check RescaleSlope/RescaleIntercept and "
            "WindowCenter/WindowWidth",
            reason="IMAGE_CORRUPT",
        )
    return decoded


def _decode_raster(data: bytes, fmt: str, limits: DecodeLimits) -> DecodedImage:
    with warnings.catch_warnings(), _bad_data(fmt, _PIL_DATA_ERRORS):
        warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
        img = PILImage.open(io.BytesIO(data))
        _check_dimensions(img.width, img.height, getattr(img, "n_frames", 1), limits)
        if (fmt == "png" and img.format != "PNG") or (fmt == "jpeg" and img.format != "JPEG"):
            raise ImageRejectedError(
                f"bytes look like {fmt.upper()} but decode as {img.format}", reason="IMAGE_CORRUPT"
            )
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
    pixels = np.asarray(gray, dtype=np.float32) * (1.0 / 255.0)
    return DecodedImage(pixels, fmt, 8)


def _positive(ds: Any, keyword: str, count: int) -> tuple[float, ...] | None:
    """`count` finite positive numbers from a DICOM DS attribute, or None (absent, `0\\0`, malformed)."""
    try:
        value = ds.get(keyword)  # pydicom converts on access: an unparsable DS raises here
        values = list(value) if isinstance(value, Sequence) and not isinstance(value, str | bytes) else [value]
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(math.isfinite(v) and v > 0 for v in numbers):
        return None
    return numbers


def _dicom_spacing(ds: Any) -> tuple[tuple[float, float] | None, str, float]:
    """(row, column) spacing in mm, its source (SPACING_*) and the magnification factor applied.

    PixelSpacing is in the patient; ImagerPixelSpacing is at the detector, where the patient is magnified
    by EstimatedRadiographicMagnificationFactor, so it is divided by that factor when the file has one."""
    pixel = _positive(ds, "PixelSpacing", 2)
    if pixel is not None:
        return (pixel[0], pixel[1]), SPACING_PIXEL, 0.0
    imager = _positive(ds, "ImagerPixelSpacing", 2)
    if imager is None:
        return None, SPACING_NONE, 0.0
    factor = _positive(ds, "EstimatedRadiographicMagnificationFactor", 1)
    if factor is None:
        return (imager[0], imager[1]), SPACING_IMAGER_UNCORRECTED, 0.0
    return (imager[0] / factor[0], imager[1] / factor[0]), SPACING_IMAGER_CORRECTED, factor[0]


def _window(arr: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing, to [0, 1], in place on a float32 array (one copy at most of a
    50-megapixel image is what keeps a small hostile file from costing gigabytes)."""
    if function == "SIGMOID":
        arr -= center
        arr *= -4.0 / width
        np.exp(arr, out=arr)
        arr += 1.0
        np.reciprocal(arr, out=arr)
        return arr
    if function == "LINEAR_EXACT":
        arr -= center - width / 2.0
        arr /= width
    else:
        if width < 1:
            raise ImageRejectedError("DICOM WindowWidth must be >= 1", reason="DICOM_INVALID_WINDOW")
        arr -= center - 0.5
        arr /= max(width - 1.0, 1e-6)
        arr += 0.5
    np.clip(arr, 0.0, 1.0, out=arr)
    return arr


def _first(value: Any) -> float:
    if hasattr(value, "__len__") and not isinstance(value, str | bytes):
        return float(value[0])
    return float(value)


# Elements pydicom's pixel decoding needs; it raises AttributeError when one is absent, which we do
# not catch (an AttributeError is far more often a bug), so their presence is checked first.
_REQUIRED_PIXEL_ELEMENTS = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation")
_REQUIRED_INTEGER_PIXEL_ELEMENTS = ("BitsStored", "PixelRepresentation")


def _is_multi(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def _header_int(ds: Any, keyword: str, default: int) -> int:
    """A single-valued integer element (US/IS); absent or empty gives `default`, several values are corrupt."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    if _is_multi(value):
        raise ImageRejectedError(f"DICOM {keyword} has {len(value)} values; one is expected", reason="IMAGE_CORRUPT")
    return int(value)


def _header_str(ds: Any, keyword: str, default: str) -> str:
    """A single-valued code string (CS); several values are corrupt."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    if _is_multi(value):
        raise ImageRejectedError(f"DICOM {keyword} has {len(value)} values; one is expected", reason="IMAGE_CORRUPT")
    return str(value)


def _check_required_elements(ds: Any) -> None:
    from pydicom.uid import UID

    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        raise ImageRejectedError("DICOM file meta has no TransferSyntaxUID (0002,0010)", reason="IMAGE_CORRUPT")
    if not isinstance(ds.file_meta.TransferSyntaxUID, UID):  # several values, or not VR UI: pydicom fails on it
        raise ImageRejectedError("DICOM TransferSyntaxUID (0002,0010) must be one UID (VR UI)", reason="IMAGE_CORRUPT")
    for keyword in ("RescaleSlope", "RescaleIntercept"):  # pydicom's modality LUT multiplies/adds them as they are
        value = ds.get(keyword)
        if value is not None and (_is_multi(value) or not isinstance(value, int | float)):  # "" too
            raise ImageRejectedError(f"DICOM {keyword} {str(value)[:40]!r} is not one number", reason="IMAGE_CORRUPT")
    required = list(_REQUIRED_PIXEL_ELEMENTS)
    if "PixelData" in ds:
        required += _REQUIRED_INTEGER_PIXEL_ELEMENTS
    if _header_int(ds, "SamplesPerPixel", 1) > 1:
        required.append("PlanarConfiguration")
    missing = [kw for kw in required if ds.get(kw) is None]
    if missing:
        raise ImageRejectedError(
            f"DICOM lacks the image pixel element(s) {missing} needed to decode its pixel data", reason="IMAGE_CORRUPT"
        )
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel", "PixelRepresentation"):
        value = ds.get(keyword)  # pydicom's pixel code compares these as they are (a string VR gives a str)
        if value is not None and (_is_multi(value) or not isinstance(value, int)):
            raise ImageRejectedError(f"DICOM {keyword} {str(value)[:40]!r} is not one integer", reason="IMAGE_CORRUPT")
    # after the checks above: reading PixelData resolves its ambiguous VR (OB/OW) from BitsAllocated
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds and not isinstance(ds[keyword].value, bytes):  # e.g. a VR of SQ: pydicom would fail
            raise ImageRejectedError(
                f"DICOM {keyword} has VR {ds[keyword].VR}, not binary pixel data", reason="IMAGE_CORRUPT"
            )


# Start-of-frame markers of JPEG (SOF0-SOF15 less DHT/JPG/DAC) and JPEG-LS (SOF55): they carry the frame size.
_JPEG_FAMILY_SYNTAXES = "1.2.840.10008.1.2.4."  # JPEG, JPEG-LS, JPEG 2000 (and HTJ2K) transfer syntaxes
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}


def _codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) a JPEG/JPEG-LS or JPEG 2000 codestream declares in its header, or None if not found."""
    soc = frame.find(b"\xff\x4f\xff\x51")  # JPEG 2000: SOC then SIZ (Xsiz, Ysiz, XOsiz, YOsiz after Lsiz, Rsiz)
    soi = frame.find(b"\xff\xd8")
    if soc >= 0 and (soi < 0 or soc < soi) and soc + 24 <= len(frame):
        xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", frame, soc + 8)
        return xsiz - xo, ysiz - yo
    i = soi + 2 if soi >= 0 else len(frame)
    while i + 9 <= len(frame) and frame[i] == 0xFF:  # JPEG: walk the marker segments up to the frame header
        if frame[i + 1] == 0xFF:
            i += 1
        elif frame[i + 1] in _JPEG_SOF:
            height, width = struct.unpack_from(">HH", frame, i + 5)
            return width, height
        else:
            i += 2 + struct.unpack_from(">H", frame, i + 2)[0]
    # a corrupt segment length ends the walk, but libjpeg resynchronises on the next marker: find the
    # frame header it would find
    start = soi if soi >= 0 else len(frame)
    while (j := frame.find(b"\xff", start)) >= 0 and j + 9 <= len(frame):
        if frame[j + 1] in _JPEG_SOF:
            height, width = struct.unpack_from(">HH", frame, j + 5)
            return width, height
        start = j + 1
    return None


def _check_codestream_size(ds: Any, rows: int, cols: int) -> None:
    """A compressed frame is decoded at the size its own header declares, not Rows x Columns: a mutated
    JPEG header of 65535x65535 made libjpeg decode 4 gigapixels for a 1024x1024 DICOM."""
    if "PixelData" not in ds or not str(ds.file_meta.TransferSyntaxUID).startswith(_JPEG_FAMILY_SYNTAXES):
        return  # RLE and deflate frames carry no size of their own (and may hold any bytes)
    size = _codestream_size(ds.PixelData[:65536])
    if size is not None and size != (cols, rows):
        raise ImageRejectedError(
            f"DICOM compressed frame declares {size[0]}x{size[1]} pixels but Rows/Columns say {cols}x{rows}",
            reason="IMAGE_CORRUPT",
        )


def _decode_dicom(data: bytes, limits: DecodeLimits) -> DecodedImage:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut  # type: ignore[attr-defined]

    data_errors = _dicom_data_errors()
    with _bad_data("dcm", data_errors):  # reading, header values, pixel decoding and LUTs: pydicom's work
        ds = pydicom.dcmread(io.BytesIO(data))
        if limits.anonymize_dicom:
            anonymize_dataset(ds)
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise ImageRejectedError(
                "DICOM has no pixel data (is it a structured report or a presentation state?)",
                reason="DICOM_NO_PIXELS",
            )
        rows, cols = _header_int(ds, "Rows", 0), _header_int(ds, "Columns", 0)
        frames = _header_int(ds, "NumberOfFrames", 1)
        _check_dimensions(cols, rows, frames, limits)
        _check_required_elements(ds)
        _check_codestream_size(ds, rows, cols)
        photometric = _header_str(ds, "PhotometricInterpretation", "MONOCHROME2").upper()
        bits_stored = _header_int(ds, "BitsStored", 0) or _header_int(ds, "BitsAllocated", 8) or 8
        samples = _header_int(ds, "SamplesPerPixel", 1)
        spacing, source, factor = _dicom_spacing(ds)
    # pydicom's encapsulated-frame reader calls next() on its frame generator, so encapsulated pixel
    # data with fewer frames (fragments) than declared surfaces as StopIteration, from this call only.
    with _bad_data("dcm", (*data_errors, StopIteration)):
        arr = ds.pixel_array
    if arr.ndim == (4 if samples > 1 else 3):  # several frames (declared, or extra bytes pydicom read as frames)
        arr = arr[0]
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim == 3:  # RGB / YBR (pydicom converts YBR to RGB by default) -> luma
            arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        pixels = arr.astype(np.float32) / float(2**bits_stored - 1)
        return DecodedImage(np.clip(pixels, 0, 1), "dcm", bits_stored, spacing, photometric, ds, source, factor)
    if arr.ndim != 2:
        raise ImageRejectedError(f"DICOM pixel array has unexpected shape {arr.shape}", reason="DICOM_UNSUPPORTED")
    with _bad_data("dcm", data_errors):
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    if values is arr or np.shares_memory(values, arr):
        values = values.copy()  # the steps below work in place
    if not np.isfinite(values.min()) or not np.isfinite(values.max()):
        raise ImageRejectedError("DICOM RescaleSlope/RescaleIntercept give non-finite values", reason="IMAGE_CORRUPT")
    with _bad_data("dcm", data_errors):  # the VOI attributes, as pydicom converts them
        voi_lut = "VOILUTSequence" in ds
        if voi_lut:
            lut_out = apply_voi_lut(arr if "ModalityLUTSequence" in ds else values, ds, index=0, prefer_lut=True)
            descriptor = ds.VOILUTSequence[0].get("LUTDescriptor")
            if not _is_multi(descriptor) or len(descriptor) != 3:
                raise ImageRejectedError("DICOM VOI LUT Descriptor must have 3 values", reason="IMAGE_CORRUPT")
            lut_bits = int(descriptor[2]) or bits_stored
        window = None
        if not voi_lut and "WindowCenter" in ds and "WindowWidth" in ds:
            window = (
                _first(ds.WindowCenter),
                _first(ds.WindowWidth),
                _header_str(ds, "VOILUTFunction", "LINEAR").upper(),
            )
        unsigned_raw = _header_int(ds, "PixelRepresentation", 0) == 0 and "RescaleSlope" not in ds
    if voi_lut:
        pixels = np.asarray(lut_out, dtype=np.float32) / float(2**lut_bits - 1)
    elif window is not None:
        pixels = _window(values, *window)
    elif unsigned_raw:
        pixels = values
        pixels /= float(2**bits_stored - 1)
    else:  # signed or rescaled without a window: use the data's own range
        lo, hi = float(values.min()), float(values.max())
        pixels = values
        if hi > lo:
            pixels -= lo
            pixels /= hi - lo
        else:
            pixels.fill(0.0)
    np.clip(pixels, 0.0, 1.0, out=pixels)
    if photometric == "MONOCHROME1":
        np.subtract(1.0, pixels, out=pixels)
    return DecodedImage(pixels, "dcm", bits_stored, spacing, photometric, ds, source, factor)


class DecodePool:
    """Decodes and preprocesses off the event loop on `server_config.num_workers` threads."""

    def __init__(self, limits: DecodeLimits, workers: int = 4) -> None:
        import concurrent.futures

        self.limits = limits
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")

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
