"""A SpecificCharacterSet (0008,0005) stored with another VR makes pydicom's charset handling fail with TypeError
wherever the value is first read: at `dcmread` for the top-level element, at anonymisation for one in a sequence
item. Each is refused as IMAGE_CORRUPT naming the element, never a 500; the same error from elsewhere propagates."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxr_serving import dicom
from cxr_serving.errors import ImageRejectedError
from cxr_serving.images import DecodeLimits, decode_image

CHARSET = b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100"  # (0008,0005) CS, 10 bytes


def _dicom(nested: bool) -> bytes:
    ds = Dataset()
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "DX", "X^Y"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.SamplesPerPixel, ds.PixelRepresentation = 7, 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.arange(64 * 64, dtype=np.uint8).tobytes()
    if nested:
        item = Dataset()
        item.SpecificCharacterSet, item.CodeMeaning = "ISO_IR 100", "x"
        ds.ProcedureCodeSequence = Sequence([item])
    else:
        ds.SpecificCharacterSet = "ISO_IR 100"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    assert data.count(CHARSET) == 1
    return data


def _element(vr: str, value: bytes) -> bytes:
    if vr == "OB":
        return b"\x08\x00\x05\x00OB\x00\x00" + struct.pack("<I", len(value)) + value
    return b"\x08\x00\x05\x00" + vr.encode() + struct.pack("<H", len(value)) + value


TOP_LEVEL = {
    "PN": _element("PN", b"A^B "),
    "PN, two values": _element("PN", b"A\\B "),
    "DS, two values": _element("DS", b"1\\2 "),
    "OB": _element("OB", b"ISO_IR 100"),
}
IN_AN_ITEM = {  # same length as the CS element, so the item's length stays right
    "PN": _element("PN", b"ISO_IR 100"),
    "IS": _element("IS", b"0000000012"),
    "DS, two values": _element("DS", b"1\\2       "),
}


@pytest.mark.parametrize("case", sorted(TOP_LEVEL))
def test_a_top_level_charset_of_another_vr_is_image_corrupt(case):
    data = _dicom(nested=False).replace(CHARSET, TOP_LEVEL[case])
    with pytest.raises(ImageRejectedError) as err:
        decode_image(data, "application/dicom", DecodeLimits())
    assert err.value.reason == "IMAGE_CORRUPT" and "SpecificCharacterSet (0008,0005)" in str(err.value)


@pytest.mark.parametrize("case", sorted(IN_AN_ITEM))
def test_a_charset_of_another_vr_in_a_sequence_item_is_image_corrupt_when_anonymised(case):
    data = _dicom(nested=True).replace(CHARSET, IN_AN_ITEM[case])
    with pytest.raises(ImageRejectedError) as err:
        decode_image(data, "application/dicom", DecodeLimits(anonymize_dicom=True))
    assert err.value.reason == "IMAGE_CORRUPT" and "SpecificCharacterSet (0008,0005)" in str(err.value)


def test_the_same_error_from_outside_the_charset_module_propagates():
    with pytest.raises(TypeError, match="ours"), dicom._charset_refused():
        raise TypeError("ours")
