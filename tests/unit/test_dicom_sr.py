"""cxr_dicom.sr: a TID 1500 SR from a real radiograph, written, re-read with pydicom and highdicom; the SEG helper."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, ComprehensiveSRStorage

from cxr_dicom.results import NOT_FOR_DIAGNOSTIC_USE, Algorithm, AlgorithmResult, Finding, Measurement
from cxr_dicom.sr import (
    NODE_VERSION,
    add_contributing_equipment_to_bytes,
    build_sr,
    device_uid,
    read_sr,
    software_versions,
    sr_bytes,
)
from tests.support.paths import DICOM_DIR

SOURCE = DICOM_DIR / "nih-dx-mono2-8bit.dcm"
CLASSIFIER = Algorithm("densenet121-res224-nih", "1.2.0", "9f2c" * 16, untrained=True)
SEGMENTER = Algorithm("cxr-unet-anatomy", "0.3.1", "a1b2" * 16, untrained=False)
FINDINGS = (
    Finding("Effusion", 0.81, 0.5, True),
    Finding("Pleural_Thickening", 0.12, 0.35, False),
)
MEASUREMENTS = (
    Measurement("cardiothoracic_ratio", 0.47, "1"),
    Measurement("heart_area", 10234.5, "mm2"),
    Measurement("left_lung_area", 20480.0, "mm2"),
)
RESULTS = (AlgorithmResult(CLASSIFIER, FINDINGS), AlgorithmResult(SEGMENTER, (), MEASUREMENTS))


def walk(items):
    """Every content item of an SR content tree, depth first."""
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def concept(item) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return code.CodingSchemeDesignator, code.get("CodeValue") or code.get("LongCodeValue")


@pytest.fixture(scope="module")
def source():
    return pydicom.dcmread(SOURCE)


@pytest.fixture(scope="module")
def written(source, tmp_path_factory):
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    path.write_bytes(sr_bytes(build_sr(source, RESULTS)))
    return path


def test_sr_is_a_comprehensive_sr_referencing_the_source_by_its_uids(source, written):
    ds = pydicom.dcmread(written)
    assert ds.SOPClassUID == ComprehensiveSRStorage and ds.Modality == "SR"
    assert UID(ds.SOPInstanceUID).is_valid and ds.SOPInstanceUID != source.SOPInstanceUID
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.PatientID == source.PatientID
    [study] = ds.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == source.StudyInstanceUID
    [series] = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    [ref] = series.ReferencedSOPSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (source.SOPClassUID, source.SOPInstanceUID)
    # TID 1500 root: Imaging Measurement Report (DCM 126000), procedure Plain radiography (SCT 168537006)
    assert concept(ds) == ("DCM", "126000")
    procedure = [i for i in ds.ContentSequence if concept(i) == ("DCM", "121058")]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "168537006"


def test_findings_are_qualitative_evaluations_with_probability_and_threshold(source, written):
    sr = hd.sr.srread(written)
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == len(FINDINGS) + 1
    for group, finding in zip(groups, FINDINGS, strict=False):
        assert group.tracking_identifier == f"{CLASSIFIER.name}/{finding.label}"
        [evaluation] = group.get_qualitative_evaluations()
        assert evaluation.value.value == ("52101004" if finding.positive else "272519000")  # Present / Absent
        assert evaluation.name == group.finding_type
        values = {(m.name.scheme_designator, m.name.value): (m.value, m.unit.value) for m in group.get_measurements()}
        assert values == {("DCM", "122157"): (finding.probability, "1"), ("DCM", "122411"): (finding.threshold, "1")}
        [image] = group.source_images
        assert image.referenced_sop_instance_uid == source.SOPInstanceUID
    # Effusion has a standard code; Pleural_Thickening a local one carrying the label
    assert (groups[0].finding_type.scheme_designator, groups[0].finding_type.value) == ("SCT", "60046008")
    assert (groups[1].finding_type.scheme_designator, groups[1].finding_type.value) == ("99CXR", "Pleural_Thickening")


def test_measurements_have_ucum_units_and_finding_sites(written):
    group = hd.sr.srread(written).content.get_image_measurement_groups()[-1]
    assert group.tracking_identifier == f"{SEGMENTER.name}/measurements"
    got = [
        (
            m.name.value,
            m.value,
            m.unit.scheme_designator,
            m.unit.value,
            [(s.value, s.laterality) for s in m.finding_sites],
        )
        for m in group.get_measurements()
    ]
    assert [g[:4] for g in got] == [
        ("cardiothoracic_ratio", 0.47, "UCUM", "1"),
        ("42798000", 10234.5, "UCUM", "mm2"),
        ("42798000", 20480.0, "UCUM", "mm2"),
    ]
    assert got[1][4][0][0].value == "80891009" and got[1][4][0][1] is None  # heart
    assert got[2][4][0][0].value == "39607008" and got[2][4][0][1].value == "7771000"  # lung, left


def test_every_group_identifies_its_algorithm(written):
    ds = pydicom.dcmread(written)
    by_group = []
    for item in walk(ds.ContentSequence):
        if concept(item) == ("DCM", "125007"):  # Measurement Group
            texts = {concept(c): c.TextValue for c in walk(c2 for c2 in item.ContentSequence) if c.ValueType == "TEXT"}
            by_group.append(texts)
    assert len(by_group) == 3
    for texts, algorithm in zip(by_group, (CLASSIFIER, CLASSIFIER, SEGMENTER), strict=True):
        assert texts[("DCM", "111001")] == algorithm.name  # Algorithm Name
        assert texts[("DCM", "111003")] == algorithm.version  # Algorithm Version
    params = [c.TextValue for c in walk(ds.ContentSequence) if concept(c) == ("DCM", "111002")]
    assert f"weights_id={CLASSIFIER.checkpoint_hash}" in params and "untrained=true" in params
    assert f"weights_id={SEGMENTER.checkpoint_hash}" in params and "untrained=false" in params
    assert not any(p.startswith("checkpoint_sha256=") for p in params)  # the service's id, not a sha256 we checked


def test_contributing_equipment_sequence_per_algorithm(written):
    ds = pydicom.dcmread(written)
    ours = [i for i in ds.ContributingEquipmentSequence if "DeviceUID" in i]
    assert [i.ManufacturerModelName for i in ours] == [CLASSIFIER.name, SEGMENTER.name]
    for item, algorithm in zip(ours, (CLASSIFIER, SEGMENTER), strict=True):
        assert item.Manufacturer == "cxr"
        assert list(item.SoftwareVersions) == [
            algorithm.version,
            algorithm.checkpoint_hash,
            f"cxr-dicom {NODE_VERSION}",
        ]
        assert item.DeviceUID == device_uid(algorithm) and UID(item.DeviceUID).is_valid
        [purpose] = item.PurposeOfReferenceCodeSequence
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
            "109102",
            "DCM",
            "Processing Equipment",
        )


def test_device_uid_is_fixed_by_the_checkpoint_hash():
    same = Algorithm(CLASSIFIER.name, "other version", CLASSIFIER.checkpoint_hash)
    retrained = Algorithm(CLASSIFIER.name, CLASSIFIER.version, "0" * 64)
    assert device_uid(same) == device_uid(CLASSIFIER)
    assert device_uid(retrained) != device_uid(CLASSIFIER)
    assert device_uid(Algorithm("another-model", "1", CLASSIFIER.checkpoint_hash)) != device_uid(CLASSIFIER)
    assert device_uid(CLASSIFIER).startswith("2.25.") and len(device_uid(CLASSIFIER)) <= 64


def test_untrained_model_says_not_for_diagnostic_use_where_a_viewer_shows_it(written):
    ds = pydicom.dcmread(written)
    assert NOT_FOR_DIAGNOSTIC_USE in ds.SeriesDescription
    language, first = ds.ContentSequence[0], ds.ContentSequence[1]
    assert concept(language) == ("DCM", "121049")  # TID 1500 row 1: Language of Content Item and Descendants
    assert first.ValueType == "TEXT" and concept(first) == ("DCM", "121106")  # Comment, right after the language
    assert [concept(i) for i in ds.ContentSequence].count(("DCM", "121106")) == 1
    assert first.TextValue.startswith(NOT_FOR_DIAGNOSTIC_USE) and CLASSIFIER.name in first.TextValue
    assert SEGMENTER.name not in first.TextValue
    equipment = {i.ManufacturerModelName: i.ContributionDescription for i in ds.ContributingEquipmentSequence}
    assert NOT_FOR_DIAGNOSTIC_USE in equipment[CLASSIFIER.name]
    assert NOT_FOR_DIAGNOSTIC_USE not in equipment[SEGMENTER.name]


def test_trained_models_only_carry_no_notice(source):
    trained = (AlgorithmResult(Algorithm(CLASSIFIER.name, "1", "f" * 64), FINDINGS),)
    data = sr_bytes(build_sr(source, trained))
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    assert NOT_FOR_DIAGNOSTIC_USE.encode() not in data
    assert ds.SeriesDescription == "cxr AI results"
    assert read_sr(data).content.get_image_measurement_groups()[0].finding_type.value == "60046008"


def test_an_sr_needs_results_and_known_measurements(source):
    with pytest.raises(ValueError):
        build_sr(source, ())
    with pytest.raises(ValueError):
        build_sr(source, (AlgorithmResult(SEGMENTER, (), (Measurement("spleen_volume", 1.0, "mm3"),)),))


def test_contributing_equipment_added_to_the_segmentation_services_seg(source):
    from cxr_segmentation.dicom_seg import build_dicom_seg

    masks = np.zeros((2, int(source.Rows), int(source.Columns)), dtype=bool)
    masks[0, 100:300, 150:250] = True
    masks[1, 200:400, 100:200] = True
    seg_bytes = build_dicom_seg(
        source, masks, ["heart", "left_lung"], algorithm_name=SEGMENTER.name, algorithm_version=SEGMENTER.version
    )
    results = (AlgorithmResult(SEGMENTER), AlgorithmResult(CLASSIFIER))
    out = add_contributing_equipment_to_bytes(seg_bytes, results)
    again = add_contributing_equipment_to_bytes(out, results)  # idempotent: one item per device
    seg = hd.seg.segread(pydicom.filebase.DicomBytesIO(again))
    with_device = [i for i in seg.ContributingEquipmentSequence if "DeviceUID" in i]
    assert len(with_device) == 2  # added twice, one item per device
    ours = {i.ManufacturerModelName: i for i in with_device}
    assert set(ours) == {SEGMENTER.name, CLASSIFIER.name}
    assert ours[SEGMENTER.name].DeviceUID == device_uid(SEGMENTER)
    assert ours[SEGMENTER.name].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert NOT_FOR_DIAGNOSTIC_USE in seg.SeriesDescription and NOT_FOR_DIAGNOSTIC_USE in seg.ContentDescription
    assert seg.SeriesDescription.count(NOT_FOR_DIAGNOSTIC_USE) == 1
    assert seg.get_segment_numbers() == [1, 2]
    [ref] = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_software_versions_name_the_model_once_and_the_node(source):
    """The worker fills the weights id from the service's ModelInfo.version: one value, not repeated."""
    same = Algorithm("binary_classifier", "abc123", "abc123")
    assert software_versions(same) == ["abc123", f"cxr-dicom {NODE_VERSION}"]
    assert NODE_VERSION != "unknown"  # the installed package's version
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(sr_bytes(build_sr(source, [AlgorithmResult(same, FINDINGS)]))))
    [item] = [i for i in ds.ContributingEquipmentSequence if "DeviceUID" in i]
    assert list(item.SoftwareVersions) == ["abc123", f"cxr-dicom {NODE_VERSION}"]
