"""DICOM Segmentation export round-trips through pydicom and highdicom on the DICOM samples."""

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from cxr_segmentation.dicom_seg import build_dicom_seg
from cxr_serving.errors import InvalidInputError
from tests.support.paths import DICOM_DIR

LABELS = ["left_lung", "right_lung", "heart"]
# Every file of ../shared/data/dicom (its README lists these; any other .dcm there is added), and the
# radiographs of pydicom-data: RG1_J2KI has PixelSpacing 0\0, JPEG-LL a Frame of Reference.
SHARED_DICOMS = (
    "nih-dx-mono1-8bit.dcm",
    "nih-dx-mono2-12bit-rle.dcm",
    "nih-dx-mono2-12bit-window.dcm",
    "nih-dx-mono2-8bit.dcm",
    "siim-cxr-mono2-jpeg-baseline.dcm",
    "siim-cxr-relabelled-mono1.dcm",
)
PYDICOM_DATA = ("RG1_J2KI.dcm", "RG3_J2KR.dcm", "JPEG-LL.dcm")
SOURCES = [
    *sorted({*SHARED_DICOMS, *(p.name for p in DICOM_DIR.glob("*.dcm"))}),
    *(f"pydicom-data:{n}" for n in PYDICOM_DATA),
]


def source_path(name: str) -> Path:
    if name.startswith("pydicom-data:"):
        found = get_testdata_file(name.split(":", 1)[1])
        assert found is not None, f"{name} is missing: install pydicom-data"
        return Path(found)
    path = DICOM_DIR / name
    assert path.is_file(), f"{path} is missing"
    return path


def pixel_spacings(ds):
    """Every PixelSpacing value anywhere in a dataset, nested sequences included."""
    found = []
    for elem in ds.iterall():
        if elem.keyword == "PixelSpacing":
            found.append([float(v) for v in elem.value])
    return found


def masks_for(ds):
    m = np.zeros((3, ds.Rows, ds.Columns), bool)
    m[0, 40:200, 30:120] = True
    m[1, 40:200, 140:240] = True  # heart left empty on purpose: empty segments are kept
    return m


@pytest.mark.parametrize("name", SOURCES)
def test_round_trip(name, recwarn):
    source = pydicom.dcmread(source_path(name))
    masks = masks_for(source)
    data = build_dicom_seg(source, masks, LABELS, algorithm_name="seg smp:Unet", algorithm_version="abc123")
    assert not any(str(source.PatientID) in str(w.message) for w in recwarn.list)  # no patient data in warnings
    written = pydicom.dcmread(io.BytesIO(data))
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, written)  # what a PACS stores and sends back
    seg = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == source.PatientID
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == source.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    np.testing.assert_array_equal(seg.pixel_array.astype(bool), masks)
    # no patient coordinate system in any of these sources: geometry is the source's, no Pixel Measures (so
    # no PixelSpacing at all, and a source's 0\0 cannot leak into the SEG)
    assert pixel_spacings(seg) == []
    parsed = hd.seg.Segmentation.from_dataset(seg)  # the dataset as read, unmodified
    assert parsed.number_of_segments == 3
    assert [parsed.get_segment_description(i + 1).segment_label for i in range(3)] == LABELS
    assert parsed.get_segment_description(3).segmented_property_type.meaning == "Heart"
    algo = parsed.get_segment_description(1).algorithm_identification
    assert algo[0].AlgorithmVersion == "abc123"
    read_back = parsed.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1, 2, 3])
    assert read_back.shape == (1, source.Rows, source.Columns, 3)
    np.testing.assert_array_equal(np.moveaxis(read_back[0], -1, 0).astype(bool), masks)


def with_patient_coordinates(spacing):
    """The NIH DX sample placed in a patient coordinate system (as a CT or MR slice would be)."""
    ds = pydicom.dcmread(DICOM_DIR / "nih-dx-mono2-8bit.dcm")
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = 2.5
    ds.PixelSpacing = spacing
    return ds


def test_patient_coordinates_keep_a_positive_pixel_spacing_and_read_back():
    source = with_patient_coordinates([0.835, 0.684])
    masks = masks_for(source)
    data = build_dicom_seg(source, masks, LABELS, algorithm_name="a", algorithm_version="v")
    seg = pydicom.dcmread(io.BytesIO(data))
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [0.835, 0.684] and float(measures.SliceThickness) == 2.5
    parsed = hd.seg.Segmentation.from_dataset(seg)
    read_back = parsed.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1, 2, 3])
    np.testing.assert_array_equal(np.moveaxis(read_back[0], -1, 0).astype(bool), masks)


@pytest.mark.parametrize("spacing", [[0, 0], [0.835, 0], [-1, 1]], ids=str)
def test_non_positive_pixel_spacing_is_never_copied_into_the_seg(spacing):
    source = with_patient_coordinates(spacing)
    with pytest.raises(InvalidInputError, match="positive PixelSpacing") as err:
        build_dicom_seg(source, masks_for(source), LABELS, algorithm_name="a", algorithm_version="v")
    assert err.value.reason == "DICOM_SEG_UNSUPPORTED"


def test_non_dicom_input_is_refused():
    with pytest.raises(InvalidInputError, match="DICOM input"):
        build_dicom_seg(None, np.zeros((1, 8, 8), bool), ["heart"], algorithm_name="x", algorithm_version="y")
