"""DICOM Part 10 reading for the one decoder: pixel pipeline, spacing, anonymisation.

The pixels go through the modality LUT (rescale slope/intercept), then the VOI LUT or window,
then MONOCHROME1 inversion, so 1 is white as a radiologist sees it. Only pydicom's documented
bad-data exceptions become IMAGE_CORRUPT (see `images.bad_data`). An 8-bit grayscale frame that no LUT
or window changes stays uint8; such a frame stored uncompressed is read straight from its bytes, and a
JPEG baseline frame of one component decodes with libjpeg-turbo (`images.decode_gray_jpeg`), rather
than through pydicom's plugin chain.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from cxr_serving.errors import ImageRejectedError
from cxr_serving.images import (
    SPACING_IMAGER_CORRECTED,
    SPACING_IMAGER_UNCORRECTED,
    SPACING_NONE,
    SPACING_PIXEL,
    DecodedImage,
    DecodeLimits,
    bad_data,
    check_dimensions,
    decode_gray_jpeg,
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


# Type 2 attributes of the Patient and General Study modules that a derived object (SEG, SR) copies from
# its source and highdicom requires to exist, if empty: an anonymised source lacks some of them.
DERIVED_TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def fill_type2(header: Any) -> None:
    """Add the Type 2 attributes a derived object copies from its source, empty where the source lacks them."""
    for keyword in DERIVED_TYPE2_KEYWORDS:
        if keyword not in header:
            setattr(header, keyword, "")


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


class _Header:
    """A dataset's top-level elements as the checks below read them, each looked up and converted once: they ask
    for the same few elements many times, and each pydicom keyword read looks the tag up and converts anew.
    Anything else is read from the dataset itself (`ds`)."""

    __slots__ = ("_present", "_syntax", "_values", "ds")

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        self._values: dict[str, Any] = {}
        self._present: dict[str, bool] = {}
        self._syntax: str | None = None

    def get(self, keyword: str) -> Any:
        """`ds.get(keyword)`, converted on first use (a value that fails to convert raises on every read)."""
        if keyword not in self._values:
            self._values[keyword] = self.ds.get(keyword)
        return self._values[keyword]

    def __contains__(self, keyword: str) -> bool:
        if keyword not in self._present:
            self._present[keyword] = keyword in self.ds
        return self._present[keyword]

    @property
    def syntax(self) -> str:
        """The transfer syntax UID (after `_check_required_elements` found one)."""
        if self._syntax is None:
            self._syntax = str(self.ds.file_meta.TransferSyntaxUID)
        return self._syntax

    def __getattr__(self, name: str) -> Any:
        if name in _Header.__slots__ or name.startswith("__"):  # not set up (a copy, a pickle): no recursion
            raise AttributeError(name)
        return getattr(self.ds, name)

    def __getitem__(self, key: Any) -> Any:
        return self.ds[key]


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
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # another VR (a PersonName, a text; a DS of inf): no integer
        raise ImageRejectedError(
            f"DICOM {keyword} {str(value)[:40]!r} is not one integer", reason="IMAGE_CORRUPT"
        ) from None


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


def _check_codestream_size(ds: _Header, rows: int, cols: int) -> None:
    """A compressed frame is decoded at the size its own header declares, not Rows x Columns: a mutated
    JPEG header of 65535x65535 made libjpeg decode 4 gigapixels for a 1024x1024 DICOM."""
    if "PixelData" not in ds or not ds.syntax.startswith(_JPEG_FAMILY_SYNTAXES):
        return  # RLE and deflate frames carry no size of their own (and may hold any bytes)
    size = _codestream_size(ds.get("PixelData")[:65536])
    if size is not None and size != (cols, rows):
        raise ImageRejectedError(
            f"DICOM compressed frame declares {size[0]}x{size[1]} pixels but Rows/Columns say {cols}x{rows}",
            reason="IMAGE_CORRUPT",
        )


JPEG_BASELINE = "1.2.840.10008.1.2.4.50"  # JPEG Baseline (Process 1): 8-bit lossy
NATIVE_LITTLE_ENDIAN = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})  # implicit / explicit VR


def _native_gray8(ds: _Header, rows: int, cols: int, samples: int) -> np.ndarray | None:
    """A single-frame, single-component, unsigned 8-bit frame stored uncompressed: a view of its bytes (what
    pydicom's `pixel_array` copies out, without its decoder pipeline), else None."""
    if (
        ds.syntax not in NATIVE_LITTLE_ENDIAN
        or samples != 1
        or _header_int(ds, "NumberOfFrames", 1) != 1
        or _header_int(ds, "BitsAllocated", 8) != 8
        or _header_int(ds, "BitsStored", 8) != 8
        or _header_int(ds, "PixelRepresentation", 0) != 0
        or "PixelData" not in ds
    ):
        return None
    data = ds.get("PixelData")
    if len(data) not in (rows * cols, rows * cols + 1):  # + 1: the pad byte of an odd length
        return None  # pydicom's own checks give the error (or its handling of extra bytes)
    return np.frombuffer(data, dtype=np.uint8, count=rows * cols).reshape(rows, cols)


def _pixel_array(ds: _Header, rows: int, cols: int, samples: int) -> np.ndarray:
    """`ds.pixel_array`, except a single-frame, single-component 8-bit frame: uncompressed, a view of its
    bytes; JPEG baseline, decoded straight."""
    native = _native_gray8(ds, rows, cols, samples)
    if native is not None:
        return native
    if (
        ds.syntax != JPEG_BASELINE
        or samples != 1
        or _header_int(ds, "NumberOfFrames", 1) != 1
        or _header_int(ds, "BitsAllocated", 8) != 8
        or "PixelData" not in ds
    ):
        return np.asarray(ds.pixel_array)
    from pydicom.encaps import generate_frames

    frame = next(generate_frames(ds.get("PixelData"), number_of_frames=1))
    arr = decode_gray_jpeg(frame)
    if arr.shape != (rows, cols):
        raise ImageRejectedError(
            f"DICOM JPEG frame is {arr.shape[1]}x{arr.shape[0]}, Rows/Columns say {cols}x{rows}", reason="IMAGE_CORRUPT"
        )
    return arr


def _plain_8bit(ds: Any, arr: np.ndarray) -> bool:
    """8-bit unsigned samples that no modality LUT, VOI LUT or window changes: value / 255 as they are."""
    return (
        arr.dtype == np.uint8
        and arr.ndim == 2
        and _header_int(ds, "BitsStored", 8) == 8
        and _header_int(ds, "PixelRepresentation", 0) == 0
        and not any(
            k in ds
            for k in ("RescaleSlope", "RescaleIntercept", "ModalityLUTSequence", "VOILUTSequence", "WindowCenter")
        )
    )


def _from_charset_module(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, passed through pydicom's charset module."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        tb = current.__traceback__
        while tb is not None:
            if tb.tb_frame.f_globals.get("__name__") == "pydicom.charset":
                return True
            tb = tb.tb_next
        current = current.__cause__ or current.__context__
    return False


@contextlib.contextmanager
def _charset_refused() -> Iterator[None]:
    """A SpecificCharacterSet (0008,0005) stored with another VR (PN, DS, OB...), at the top level or in a
    sequence item, makes pydicom's charset handling fail with TypeError or AttributeError wherever the value
    is first read (dcmread, anonymisation): refused as corrupt. The same errors from anywhere else are defects
    and propagate."""
    try:
        yield
    except (TypeError, AttributeError, LookupError) as exc:
        if not _from_charset_module(exc):
            raise
        raise ImageRejectedError(
            f"DICOM SpecificCharacterSet (0008,0005) could not be used ({type(exc).__name__}: {str(exc)[:160]})",
            reason="IMAGE_CORRUPT",
        ) from exc


def decode_dicom(data: bytes, limits: DecodeLimits) -> DecodedImage:
    with _charset_refused():
        return _decode_dicom(data, limits)


def _decode_dicom(data: bytes, limits: DecodeLimits) -> DecodedImage:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut  # type: ignore[attr-defined]

    data_errors = _dicom_data_errors()
    with bad_data("dcm", data_errors):  # reading, header values, pixel decoding and LUTs: pydicom's work
        ds = pydicom.dcmread(io.BytesIO(data))
        if limits.anonymize_dicom:
            anonymize_dataset(ds)
        hdr = _Header(ds)
        if "PixelData" not in hdr and "FloatPixelData" not in hdr and "DoubleFloatPixelData" not in hdr:
            raise ImageRejectedError(
                "DICOM has no pixel data (is it a structured report or a presentation state?)",
                reason="DICOM_NO_PIXELS",
            )
        rows, cols = _header_int(hdr, "Rows", 0), _header_int(hdr, "Columns", 0)
        frames = _header_int(hdr, "NumberOfFrames", 1)
        check_dimensions(cols, rows, frames, limits)
        _check_required_elements(hdr)
        _check_codestream_size(hdr, rows, cols)
        photometric = _header_str(hdr, "PhotometricInterpretation", "MONOCHROME2").upper()
        bits_stored = _header_int(hdr, "BitsStored", 0) or _header_int(hdr, "BitsAllocated", 8) or 8
        samples = _header_int(hdr, "SamplesPerPixel", 1)
        spacing, source, factor = _dicom_spacing(hdr)
    # pydicom's encapsulated-frame reader calls next() on its frame generator, so encapsulated pixel
    # data with fewer frames (fragments) than declared surfaces as StopIteration, from this call only.
    with bad_data("dcm", (*data_errors, StopIteration)):
        arr = _pixel_array(hdr, rows, cols, samples)
    if arr.ndim == (4 if samples > 1 else 3):  # several frames (declared, or extra bytes pydicom read as frames)
        arr = arr[0]
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim == 3:  # RGB / YBR (pydicom converts YBR to RGB by default) -> luma
            arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        pixels = arr.astype(np.float32) / float(2**bits_stored - 1)
        return DecodedImage(np.clip(pixels, 0, 1), "dcm", bits_stored, spacing, photometric, ds, source, factor)
    if arr.ndim != 2:
        raise ImageRejectedError(f"DICOM pixel array has unexpected shape {arr.shape}", reason="DICOM_UNSUPPORTED")
    with bad_data("dcm", data_errors):
        plain = _plain_8bit(hdr, arr)
    if plain:
        gray = np.subtract(np.uint8(255), arr) if photometric == "MONOCHROME1" else np.array(arr, order="C")
        return DecodedImage(gray, "dcm", bits_stored, spacing, photometric, ds, source, factor)
    with bad_data("dcm", data_errors):
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    if values is arr or np.shares_memory(values, arr):
        values = values.copy()  # the steps below work in place
    if not np.isfinite(values.min()) or not np.isfinite(values.max()):
        raise ImageRejectedError("DICOM RescaleSlope/RescaleIntercept give non-finite values", reason="IMAGE_CORRUPT")
    with bad_data("dcm", data_errors):  # the VOI attributes, as pydicom converts them
        voi_lut = "VOILUTSequence" in hdr
        if voi_lut:
            lut_out = apply_voi_lut(arr if "ModalityLUTSequence" in ds else values, ds, index=0, prefer_lut=True)
            descriptor = ds.VOILUTSequence[0].get("LUTDescriptor")
            if not _is_multi(descriptor) or len(descriptor) != 3:
                raise ImageRejectedError("DICOM VOI LUT Descriptor must have 3 values", reason="IMAGE_CORRUPT")
            lut_bits = int(descriptor[2]) or bits_stored
        window = None
        if not voi_lut and "WindowCenter" in hdr and "WindowWidth" in hdr:
            window = (
                _first(ds.WindowCenter),
                _first(ds.WindowWidth),
                _header_str(hdr, "VOILUTFunction", "LINEAR").upper(),
            )
        unsigned_raw = _header_int(hdr, "PixelRepresentation", 0) == 0 and "RescaleSlope" not in hdr
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
