"""The intake check of one DICOM instance, so the node refuses what it cannot analyse with the status DICOM defines.

Accepted: a projection radiograph, i.e. a CR or DX image SOP class (DX for presentation or for processing),
or a Secondary Capture image whose Modality is CR or DX, that carries pixel data the platform's own decoder
(`cxr_serving.images.decode_image`, the one the classification and segmentation services run) can decode.
An instance refused here was never accepted, so it is never lost: the sender keeps it and sees why.

Each refusal is a `Refusal` with a `RefusalKind`; the kind gives the C-STORE response status (PS3.4
Annex B.2.3 for the Storage Service Class, PS3.7 Annex C for the general statuses) and the STOW-RS
FailureReason (0008,1197) of the FailedSOPSequence item (PS3.18, Store Instances response). The C-STORE
response also carries the reason as its Error Comment (0000,0902).

- CANNOT_UNDERSTAND (not DICOM Part 10, cut short, pixel data that does not decode):
  C-STORE 0xC000 "Cannot understand"; STOW-RS 0xC000.
- SOP_CLASS_NOT_SUPPORTED (not a CR/DX image: SR, CT, SEG...; or a Secondary Capture of another modality):
  C-STORE 0xA900 "Error: Data Set does not match SOP Class", the Storage Service Class's failure (PS3.4
  B.2.3) for an instance the SCP will not store as sent: the node accepts a presentation context for every
  storage SOP class, so that a sender learns why per instance, and the general 0x0122 "SOP Class not
  supported" (PS3.7 C.5) would contradict the context it accepted; STOW-RS 0x0122 "Referenced SOP Class not
  supported" (PS3.18 has no negotiation to contradict).
- DOES_NOT_MATCH_SOP_CLASS (a radiograph class without pixel data, rows/columns or UIDs; a SOP class other
  than the declared one): C-STORE 0xA900 "Data Set does not match SOP Class"; STOW-RS 0xA900.
- TRANSFER_SYNTAX_NOT_SUPPORTED (pixel data in a transfer syntax no installed decoder reads): C-STORE 0xC000
  (C-STORE negotiates syntaxes, so once one is accepted the SCP "cannot understand" it); STOW-RS 0xC122
  "Referenced Transfer Syntax not supported".

0xC000 is used exactly: pynetdicom uses 0xC001-0xC2xx for its own handler failures, so the sender can tell
our refusal from a crash. Refusal messages name classes, modalities and sizes only, never patient data.
"""

from __future__ import annotations

import enum
import io
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

RADIOGRAPH_SOP_CLASSES: frozenset[str] = frozenset(
    {ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation, DigitalXRayImageStorageForProcessing}
)
SECONDARY_CAPTURE_SOP_CLASSES: frozenset[str] = frozenset({SecondaryCaptureImageStorage})
RADIOGRAPH_MODALITIES: frozenset[str] = frozenset({"CR", "DX"})

# (7FE0,0010) Pixel Data as it appears in little-endian encodings.
_PIXEL_DATA_TAG_BYTES = b"\xe0\x7f\x10\x00"


class RefusalKind(enum.Enum):
    """Why an instance is refused, with (C-STORE status, STOW-RS FailureReason)."""

    CANNOT_UNDERSTAND = (0xC000, 0xC000)
    SOP_CLASS_NOT_SUPPORTED = (0xA900, 0x0122)
    DOES_NOT_MATCH_SOP_CLASS = (0xA900, 0xA900)
    TRANSFER_SYNTAX_NOT_SUPPORTED = (0xC000, 0xC122)

    @property
    def dimse_status(self) -> int:
        return self.value[0]

    @property
    def stow_failure_reason(self) -> int:
        return self.value[1]


class Refusal(Exception):
    """An instance the node does not accept; carries the statuses to answer with and what UIDs were readable."""

    def __init__(self, kind: RefusalKind, message: str, *, sop_class_uid: str = "", sop_instance_uid: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid

    @property
    def dimse_status(self) -> int:
        return self.kind.dimse_status

    @property
    def stow_failure_reason(self) -> int:
        return self.kind.stow_failure_reason

    def dimse_response(self) -> Dataset:
        """The C-STORE response's status and Error Comment (the reason, cut to the 64 characters of an LO)."""
        status = Dataset()
        status.Status = self.dimse_status
        status.ErrorComment = self.message[:64]
        return status

    def failed_sop_item(self) -> Dataset:
        """The item of a STOW-RS response's FailedSOPSequence (0008,1198) for this instance."""
        item = Dataset()
        item.ReferencedSOPClassUID = self.sop_class_uid
        item.ReferencedSOPInstanceUID = self.sop_instance_uid
        item.FailureReason = self.stow_failure_reason
        return item


@dataclass(frozen=True)
class Accepted:
    """An instance that passed: its dataset and the identifiers the queue and the results need."""

    dataset: Dataset
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    transfer_syntax_uid: str


def _uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip() if value else ""


def check_dataset(ds: Dataset, declared_sop_class: str | None = None) -> Accepted:
    """The header checks: SOP class, modality, pixel data and UIDs. Raises Refusal."""
    sop_class = _uid(ds, "SOPClassUID")
    sop_instance = _uid(ds, "SOPInstanceUID")
    ids = {"sop_class_uid": sop_class or (declared_sop_class or ""), "sop_instance_uid": sop_instance}
    if not sop_class:
        raise Refusal(RefusalKind.DOES_NOT_MATCH_SOP_CLASS, "the instance has no SOP Class UID", **ids)
    if declared_sop_class and declared_sop_class != sop_class:
        raise Refusal(
            RefusalKind.DOES_NOT_MATCH_SOP_CLASS,
            f"the data set is {UID(sop_class).name} but was sent as {UID(declared_sop_class).name}",
            **ids,
        )
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if sop_class in SECONDARY_CAPTURE_SOP_CLASSES:
        if modality not in RADIOGRAPH_MODALITIES:
            raise Refusal(
                RefusalKind.SOP_CLASS_NOT_SUPPORTED,
                f"Secondary Capture with Modality {modality or '(none)'}: only CR/DX secondary captures are analysed",
                **ids,
            )
    elif sop_class not in RADIOGRAPH_SOP_CLASSES:
        raise Refusal(
            RefusalKind.SOP_CLASS_NOT_SUPPORTED,
            f"{UID(sop_class).name} is not a projection radiograph (CR, DX, or a CR/DX Secondary Capture)",
            **ids,
        )
    missing = [k for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not _uid(ds, k)]
    missing += [k for k in ("Rows", "Columns", "BitsAllocated", "PixelData") if ds.get(k) in (None, b"", 0)]
    if missing:
        raise Refusal(
            RefusalKind.DOES_NOT_MATCH_SOP_CLASS,
            f"{UID(sop_class).name} without {', '.join(missing)}",
            **ids,
        )
    meta = getattr(ds, "file_meta", None)
    syntax = _uid(meta, "TransferSyntaxUID") if meta is not None else ""
    return Accepted(
        dataset=ds,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_instance_uid=_uid(ds, "StudyInstanceUID"),
        series_instance_uid=_uid(ds, "SeriesInstanceUID"),
        modality=modality,
        transfer_syntax_uid=syntax,
    )


def check_transfer_syntax(syntax: str, ids: dict[str, str]) -> None:
    """Refuse pixel data no installed pixel decoder can read (before trying to decode it)."""
    from pydicom.pixels.decoders.base import get_decoder

    try:
        available = get_decoder(UID(syntax)).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise Refusal(
            RefusalKind.TRANSFER_SYNTAX_NOT_SUPPORTED,
            f"no installed decoder reads pixel data in {UID(syntax).name or syntax or '(no transfer syntax)'}",
            **ids,
        )


def read_header(data: bytes) -> Dataset:
    """The header of a Part 10 file (no pixel data), or an empty data set when it does not parse."""
    try:
        return dcmread(io.BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError):
        return Dataset()


def check_part10(data: bytes, declared_sop_class: str | None = None, *, decode: bool = True) -> Accepted:
    """Parse a DICOM Part 10 file (a C-STORE's encoded data set with its file meta, or a STOW-RS part) and
    check it; with ``decode`` the pixels go through the platform decoder, so an image the services would
    refuse as corrupt is refused here, before anything is accepted. Raises Refusal."""
    from cxr_serving.errors import ImageRejectedError
    from cxr_serving.images import decode_image

    try:
        ds = dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError) as exc:
        raise Refusal(
            RefusalKind.CANNOT_UNDERSTAND,
            f"not a readable DICOM Part 10 file ({type(exc).__name__})",
            sop_class_uid=declared_sop_class or "",
        ) from None
    if "PixelData" not in ds and _PIXEL_DATA_TAG_BYTES in data:
        # pydicom reads a file cut short leniently and drops the unfinished element (or, cut inside
        # encapsulated pixel data, every element): the bytes name Pixel Data, the data set has none, so the
        # file was truncated. Its header, read alone, still names the instance for the sender.
        header = read_header(data)
        raise Refusal(
            RefusalKind.CANNOT_UNDERSTAND,
            "the file ends inside its pixel data (truncated)",
            sop_class_uid=_uid(header, "SOPClassUID") or (declared_sop_class or ""),
            sop_instance_uid=_uid(header, "SOPInstanceUID"),
        )
    ids = {
        "sop_class_uid": _uid(ds, "SOPClassUID") or (declared_sop_class or ""),
        "sop_instance_uid": _uid(ds, "SOPInstanceUID"),
    }
    accepted = check_dataset(ds, declared_sop_class)
    check_transfer_syntax(accepted.transfer_syntax_uid, ids)
    if decode:
        try:
            decode_image(data, "application/dicom")
        except ImageRejectedError as exc:
            raise Refusal(
                RefusalKind.CANNOT_UNDERSTAND, f"the pixel data does not decode ({exc.reason})", **ids
            ) from None
    return accepted


def refusal_log_fields(refusal: Refusal) -> dict[str, Any]:
    """What a log line about a refusal may carry: status codes, the class and the reason, no patient data."""
    return {
        "dimse_status": f"0x{refusal.dimse_status:04X}",
        "stow_failure_reason": f"0x{refusal.stow_failure_reason:04X}",
        "kind": refusal.kind.name,
        "sop_class": UID(refusal.sop_class_uid).name if refusal.sop_class_uid else "",
        "reason": refusal.message,
    }
