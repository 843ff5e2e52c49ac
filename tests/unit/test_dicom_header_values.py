"""Integer header elements the DICOM decoder reads (Rows, Columns, SamplesPerPixel, NumberOfFrames, BitsStored)
stored with another VR whose value is no integer (a DS of inf or 1e400, a PN) are refused as IMAGE_CORRUPT, naming
the element, rather than surfacing as an unmapped error; and the header wrapper never recurses into itself."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxr_serving.dicom import _Header
from cxr_serving.errors import ImageRejectedError
from cxr_serving.images import decode_image


def dicom_with(keyword: str, vr: str, value: str) -> bytes:
    """A 64 x 64 8-bit MONOCHROME2 image whose `keyword` is stored as `vr` with `value`."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelData = 1, "MONOCHROME2", bytes(64 * 64)
    if keyword in ds:
        del ds[keyword]
    ds.add_new(pydicom.datadict.tag_for_keyword(keyword), vr, value)
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize(
    ("keyword", "vr", "value"),
    [
        ("Rows", "DS", "inf"),
        ("Columns", "DS", "1e400"),
        ("SamplesPerPixel", "DS", "inf"),
        ("NumberOfFrames", "DS", "-inf"),
        ("SamplesPerPixel", "PN", "Doe^John"),
    ],
)
def test_a_non_integer_value_is_refused_as_corrupt(keyword, vr, value):
    with pytest.raises(ImageRejectedError) as err:
        decode_image(dicom_with(keyword, vr, value))
    assert err.value.reason == "IMAGE_CORRUPT" and keyword in err.value.message, err.value.message


def test_the_header_wrapper_without_its_dataset_raises_attribute_error():
    empty = object.__new__(_Header)  # as a copy or an unpickled one could be, before its slots are set
    with pytest.raises(AttributeError):
        _ = empty.Rows
