"""A DICOM Segmentation object (highdicom) for a DICOM input, so PACS viewers can show the masks."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from cxr_serving.dicom import fill_type2
from cxr_serving.errors import InvalidInputError

# SNOMED CT property types; laterality stays in the segment label.
_SCT_KEYWORD = {
    "lung": "Lung",
    "heart": "Heart",
    "clavicle": "Clavicle",
    "scapula": "Scapula",
    "aorta": "Aorta",
    "spine": "Spine",
    "mediastinum": "Mediastinum",
    "weasand": "Esophagus",
    "diaphragmatica": "Diaphragm",
}


# What highdicom copies into the SEG's Pixel Measures functional group.
_PIXEL_MEASURES = ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices")


def _positive_spacing(source: Any) -> bool:
    try:
        value = source.get("PixelSpacing")  # pydicom converts on access: an unparsable DS raises here
        return len(value) == 2 and all(math.isfinite(float(v)) and float(v) > 0 for v in value)
    except (TypeError, ValueError):
        return False


def _source_header(source: Any) -> Any:
    """The source's header without pixel data, with missing type 2 attributes added empty.

    Without a patient coordinate system (Frame of Reference and Image Position; a projection radiograph has
    neither) the Pixel Measures attributes are left out: PS3.3 A.51.5 then ties each SEG pixel to the
    referenced source pixel (Derivation Image), the macro is not allowed, and highdicom's reader refuses the
    one it would write (no SliceThickness). With one, PixelSpacing must be positive: `0\\0` is never copied."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.tag import Tag

    patient_coordinates = "FrameOfReferenceUID" in source and "ImagePositionPatient" in source
    if patient_coordinates and not _positive_spacing(source):
        raise InvalidInputError(
            "a DICOM Segmentation in the patient coordinate system needs a positive PixelSpacing, and this "
            "DICOM's is missing, malformed or not positive",
            reason="DICOM_SEG_UNSUPPORTED",
        )
    header = Dataset()
    header.file_meta = getattr(source, "file_meta", None) or FileMetaDataset()
    skipped = {Tag("PixelData"), Tag("FloatPixelData"), Tag("DoubleFloatPixelData")}
    if not patient_coordinates:
        skipped |= {Tag(keyword) for keyword in _PIXEL_MEASURES}
    for elem in source:
        if elem.tag not in skipped:
            header.add(elem)
    fill_type2(header)
    return header


def _property_type(label: str) -> Any:
    from pydicom.sr.codedict import codes

    for part, keyword in _SCT_KEYWORD.items():
        if part in label.lower():
            return getattr(codes.SCT, keyword)
    return codes.SCT.AnatomicalStructure


def build_dicom_seg(
    source: Any,
    masks: np.ndarray,
    labels: Sequence[str],
    *,
    algorithm_name: str,
    algorithm_version: str,
    software_version: str = "cxr-segmentation",
) -> bytes:
    """Encode `masks` (C x H x W bool, the source's size) as a binary DICOM-SEG referencing `source`."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import ExplicitVRLittleEndian

    if source is None:
        raise InvalidInputError("include_dicom_seg needs a DICOM input (the SEG references its source image)")
    rows, cols = int(source.Rows), int(source.Columns)
    if masks.shape[1:] != (rows, cols):
        raise ValueError(f"masks {masks.shape[1:]} do not match the DICOM's {rows}x{cols}")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name[:64] or "cxr-segmentation",
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm_version[:64] or "unknown",
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=label[:64],
            segmented_property_category=codes.SCT.Organ
            if _property_type(label) in (codes.SCT.Lung, codes.SCT.Heart)
            else codes.SCT.AnatomicalStructure,
            segmented_property_type=_property_type(label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for i, label in enumerate(labels)
    ]
    try:
        with warnings.catch_warnings():
            # highdicom warns about person names and quotes them: keep patient data out of the logs.
            warnings.simplefilter("ignore", UserWarning)
            seg = hd.seg.Segmentation(
                source_images=[_source_header(source)],
                pixel_array=np.moveaxis(masks.astype(np.uint8), 0, -1)[None],  # frames x H x W x segments
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=hd.UID(),
                series_number=9901,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="cxr",
                manufacturer_model_name=algorithm_name[:64] or "cxr-segmentation",
                software_versions=software_version[:64],
                device_serial_number="0",
                transfer_syntax_uid=ExplicitVRLittleEndian,
                omit_empty_frames=False,
            )
    except (ValueError, AttributeError, TypeError) as exc:
        raise InvalidInputError(
            f"a DICOM Segmentation cannot be built for this DICOM ({type(exc).__name__}: {str(exc)[:200]})",
            reason="DICOM_SEG_UNSUPPORTED",
        ) from None
    buf = io.BytesIO()
    seg.save_as(buf)
    return buf.getvalue()
