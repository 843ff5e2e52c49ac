"""security.anonymize_dicom: identifying DICOM attributes are stripped right after reading."""

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxr_serving.dicom import ANONYMIZED, IDENTIFYING_DICOM_KEYWORDS
from cxr_serving.images import DecodeLimits, decode_image
from cxr_serving.settings import load_settings
from tests.support.paths import dicom_files

PLANTED = {
    "PatientName": "Doe^Jane",
    "PatientID": "MRN-4711",
    "PatientBirthDate": "19700101",
    "OtherPatientIDs": "ALT-99",
    "PatientAddress": "1 Main St",
    "PatientTelephoneNumbers": "555-0100",
    "InstitutionName": "St Planted Hospital",
    "InstitutionAddress": "2 Hospital Rd",
    "ReferringPhysicianName": "Who^Doctor",
    "PerformingPhysicianName": "Perf^Doc",
    "OperatorsName": "Op^Erator",
    "AccessionNumber": "ACC123",
    "StudyID": "STUDY9",
}


def planted_dicom(path: Path) -> bytes:
    ds = pydicom.dcmread(path)
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)
    ds.PatientSex = "F"
    ds.PatientAge = "055Y"
    block = ds.private_block(0x0011, "CXR PLANTED", create=True)
    block.add_new(0x01, "LO", "secret-private-value")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _has_private(ds: pydicom.Dataset) -> bool:
    return any(elem.tag.is_private for elem in ds)


@pytest.mark.parametrize("path", dicom_files()[:3], ids=lambda p: p.name)
def test_identifiers_removed_when_on_and_pixels_identical(path: Path):
    data = planted_dicom(path)
    kept = decode_image(data, "application/dicom", DecodeLimits())
    anon = decode_image(data, "application/dicom", DecodeLimits(anonymize_dicom=True))
    for keyword, value in PLANTED.items():
        assert str(kept.dataset.get(keyword)) == value
    assert _has_private(kept.dataset)
    assert str(anon.dataset.PatientName) == ANONYMIZED and anon.dataset.PatientID == ANONYMIZED
    for keyword in set(PLANTED) - {"PatientName", "PatientID"}:
        assert keyword not in anon.dataset, keyword
    assert not _has_private(anon.dataset)
    assert anon.dataset.PatientSex == "F" and anon.dataset.PatientAge == "055Y"
    text = str(anon.dataset)
    for value in [*PLANTED.values(), "secret-private-value"]:
        assert value not in text
    np.testing.assert_array_equal(anon.pixels, kept.pixels)
    assert anon.pixel_spacing_mm == kept.pixel_spacing_mm


def test_keyword_list_is_valid_dicom():
    from pydicom.datadict import tag_for_keyword

    assert all(tag_for_keyword(k) is not None for k in IDENTIFYING_DICOM_KEYWORDS)


def test_setting_reaches_decode_limits():
    sec = load_settings(None, environ={"CXR_SECURITY__ANONYMIZE_DICOM": "true"}).security
    assert sec.anonymize_dicom is True
    limits = DecodeLimits.from_settings(
        sec.allowed_image_formats, sec.max_image_size_mb, sec.max_image_pixels, anonymize_dicom=sec.anonymize_dicom
    )
    assert limits.anonymize_dicom
    assert not DecodeLimits.from_settings(["png"], 1, 100).anonymize_dicom
    assert load_settings(None, environ={}).security.anonymize_dicom is False
