"""DICOM Segmentation export round-trips through pydicom and highdicom on the DICOM samples."""

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest

from cxr_segmentation.dicom_seg import build_dicom_seg
from cxr_serving.errors import InvalidInputError
from tests.conftest import dicom_files

LABELS = ["left_lung", "right_lung", "heart"]


def masks_for(ds):
    m = np.zeros((3, ds.Rows, ds.Columns), bool)
    m[0, 40:200, 30:120] = True
    m[1, 40:200, 140:240] = True  # heart left empty on purpose: empty segments are kept
    return m


@pytest.mark.parametrize("path", dicom_files(), ids=lambda p: p.name)
def test_round_trip(path, recwarn):
    source = pydicom.dcmread(path)
    masks = masks_for(source)
    data = build_dicom_seg(source, masks, LABELS, algorithm_name="seg smp:Unet", algorithm_version="abc123")
    assert not any(str(source.PatientID) in str(w.message) for w in recwarn.list)  # no patient data in warnings
    seg = pydicom.dcmread(io.BytesIO(data))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == source.PatientID
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == source.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    np.testing.assert_array_equal(seg.pixel_array.astype(bool), masks)
    # highdicom's reader insists on SliceThickness in the Pixel Measures macro, which the standard only
    # requires for volumetric frames; drop the macro on our copy to read a projection radiograph's SEG.
    del seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    parsed = hd.seg.Segmentation.from_dataset(seg)
    assert parsed.number_of_segments == 3
    assert [parsed.get_segment_description(i + 1).segment_label for i in range(3)] == LABELS
    assert parsed.get_segment_description(3).segmented_property_type.meaning == "Heart"
    algo = parsed.get_segment_description(1).algorithm_identification
    assert algo[0].AlgorithmVersion == "abc123"


def test_non_dicom_input_is_refused():
    with pytest.raises(InvalidInputError, match="DICOM input"):
        build_dicom_seg(None, np.zeros((1, 8, 8), bool), ["heart"], algorithm_name="x", algorithm_version="y")
