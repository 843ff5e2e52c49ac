"""cxr_dicom.acceptance: real radiographs pass; non-images, wrong modalities and corrupt files get the right status."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cxr_dicom.acceptance import Refusal, RefusalKind, check_dataset, check_part10, refusal_log_fields
from tests.support.paths import DICOM_DIR, cxr14_images, dicom_files

DX_8BIT = DICOM_DIR / "nih-dx-mono2-8bit.dcm"
SIIM_JPEG = DICOM_DIR / "siim-cxr-mono2-jpeg-baseline.dcm"
RLE = DICOM_DIR / "nih-dx-mono2-12bit-rle.dcm"


def to_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def refusal_of(data: bytes, declared: str | None = None) -> Refusal:
    with pytest.raises(Refusal) as info:
        check_part10(data, declared)
    return info.value


@pytest.mark.parametrize("path", dicom_files(), ids=lambda p: p.name)
def test_every_shared_radiograph_is_accepted(path):
    data = path.read_bytes()
    ds = pydicom.dcmread(path)
    accepted = check_part10(data, declared_sop_class=str(ds.SOPClassUID))
    assert accepted.sop_instance_uid == ds.SOPInstanceUID
    assert accepted.study_instance_uid == ds.StudyInstanceUID
    assert accepted.series_instance_uid == ds.SeriesInstanceUID
    assert accepted.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert accepted.modality in {"CR", "DX"}
    # the SIIM files are Secondary Captures whose Modality is CR: accepted through the modality rule
    if path.name.startswith("siim"):
        assert accepted.sop_class_uid == SecondaryCaptureImageStorage and accepted.modality == "CR"
    else:
        assert accepted.sop_class_uid == DigitalXRayImageStorageForPresentation


def test_cr_sop_class_is_accepted():
    ds = pydicom.dcmread(DX_8BIT)
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.Modality = "CR"
    assert check_part10(to_bytes(ds)).sop_class_uid == ComputedRadiographyImageStorage


def _basic_text_sr() -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    return ds


def test_structured_report_is_refused_as_sop_class_not_supported():
    sr = _basic_text_sr()
    refusal = refusal_of(to_bytes(sr))
    assert refusal.kind is RefusalKind.SOP_CLASS_NOT_SUPPORTED
    assert (refusal.dimse_status, refusal.stow_failure_reason) == (0xA900, 0x0122)
    assert refusal.sop_instance_uid == sr.SOPInstanceUID and refusal.sop_class_uid == BasicTextSRStorage
    item = refusal.failed_sop_item()
    assert item.FailureReason == 0x0122
    assert item.ReferencedSOPInstanceUID == sr.SOPInstanceUID and item.ReferencedSOPClassUID == BasicTextSRStorage


def test_real_ct_image_is_refused_as_sop_class_not_supported():
    refusal = refusal_of(open(get_testdata_file("CT_small.dcm"), "rb").read())
    assert refusal.kind is RefusalKind.SOP_CLASS_NOT_SUPPORTED and refusal.dimse_status == 0xA900
    assert "CT Image Storage" in refusal.message


def test_secondary_capture_of_another_modality_is_refused():
    ds = pydicom.dcmread(SIIM_JPEG)
    ds.Modality = "OT"
    refusal = refusal_of(to_bytes(ds))
    assert refusal.kind is RefusalKind.SOP_CLASS_NOT_SUPPORTED and "Modality OT" in refusal.message


def test_radiograph_without_pixel_data_does_not_match_its_sop_class():
    ds = pydicom.dcmread(DX_8BIT)
    del ds.PixelData
    refusal = refusal_of(to_bytes(ds))
    assert refusal.kind is RefusalKind.DOES_NOT_MATCH_SOP_CLASS
    assert (refusal.dimse_status, refusal.stow_failure_reason) == (0xA900, 0xA900)
    assert "PixelData" in refusal.message
    assert refusal.failed_sop_item().FailureReason == 0xA900


def test_radiograph_without_study_uid_does_not_match_its_sop_class():
    ds = pydicom.dcmread(DX_8BIT)
    del ds.StudyInstanceUID
    with pytest.raises(Refusal) as info:
        check_dataset(ds)
    assert info.value.kind is RefusalKind.DOES_NOT_MATCH_SOP_CLASS and "StudyInstanceUID" in info.value.message


def test_sop_class_other_than_the_declared_one_is_refused():
    refusal = refusal_of(DX_8BIT.read_bytes(), declared=ComputedRadiographyImageStorage)
    assert refusal.kind is RefusalKind.DOES_NOT_MATCH_SOP_CLASS and refusal.dimse_status == 0xA900


@pytest.mark.parametrize("path", [DX_8BIT, SIIM_JPEG, RLE], ids=lambda p: p.name)
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_files_cannot_be_understood(path, keep):
    data = path.read_bytes()
    refusal = refusal_of(data[: int(len(data) * keep)])
    assert refusal.kind is RefusalKind.CANNOT_UNDERSTAND
    assert (refusal.dimse_status, refusal.stow_failure_reason) == (0xC000, 0xC000)
    assert refusal.sop_instance_uid == pydicom.dcmread(path).SOPInstanceUID  # readable header: the UID is known


def test_file_cut_inside_its_header_cannot_be_understood():
    assert refusal_of(DX_8BIT.read_bytes()[:100]).kind is RefusalKind.CANNOT_UNDERSTAND


def test_png_is_not_dicom():
    refusal = refusal_of(cxr14_images(1)[0].read_bytes(), declared=DigitalXRayImageStorageForPresentation)
    assert refusal.kind is RefusalKind.CANNOT_UNDERSTAND and refusal.dimse_status == 0xC000
    assert refusal.failed_sop_item().ReferencedSOPClassUID == DigitalXRayImageStorageForPresentation


def test_corrupt_compressed_pixel_data_cannot_be_understood():
    ds = pydicom.dcmread(RLE)
    raw = bytearray(ds.PixelData)
    raw[200:4000] = b"\xff" * 3800  # inside the RLE segments: the frame no longer decodes to 512x512
    ds.PixelData = bytes(raw)
    refusal = refusal_of(to_bytes(ds))
    assert refusal.kind is RefusalKind.CANNOT_UNDERSTAND and "IMAGE_CORRUPT" in refusal.message


def test_transfer_syntax_without_decoder_is_refused_with_c122_for_stow():
    ds = pydicom.dcmread(SIIM_JPEG)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no pydicom pixel decoder
    refusal = refusal_of(to_bytes(ds))
    assert refusal.kind is RefusalKind.TRANSFER_SYNTAX_NOT_SUPPORTED
    assert (refusal.dimse_status, refusal.stow_failure_reason) == (0xC000, 0xC122)


def test_refusal_log_fields_carry_no_patient_data():
    ds = pydicom.dcmread(DX_8BIT)
    ds.PatientName = "ZQXWORTH^JANE"
    ds.PatientID = "MRN-123456"
    del ds.PixelData
    fields = refusal_log_fields(refusal_of(to_bytes(ds)))
    assert fields["dimse_status"] == "0xA900" and fields["stow_failure_reason"] == "0xA900"
    assert fields["sop_class"] == "Digital X-Ray Image Storage - For Presentation"
    assert "ZQXWORTH" not in repr(fields) and "MRN" not in repr(fields)
