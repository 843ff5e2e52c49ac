"""cxr_dicom.codes: every standard code the SR and FHIR use is published in DICOM PS3.16 with that meaning."""

from __future__ import annotations

import pytest
from pydicom.sr import _concepts_dict

from cxr_dicom import codes


def standard_concepts() -> list[codes.Concept]:
    found = [
        *codes.FINDINGS.values(),
        *codes.ANATOMY.values(),
        *codes.LATERALITY.values(),
        codes.AREA,
        codes.WIDTH,
        codes.PROBABILITY,
        codes.THRESHOLD,
        codes.PRESENT,
        codes.ABSENT,
        codes.COMMENT,
        codes.PLAIN_RADIOGRAPHY,
        *codes.UNITS.values(),
    ]
    return [c for c in found if c.standard]


@pytest.mark.parametrize("concept", standard_concepts(), ids=lambda c: f"{c.scheme}-{c.code}")
def test_standard_code_is_in_the_dicom_content_mapping_resource(concept):
    if concept.scheme == codes.UCUM and concept.code == "{pixels}":
        pytest.skip("UCUM annotation (a unity with a label): valid UCUM, not enumerated in PS3.16")
    meanings = {
        meaning.lower()
        for by_code in _concepts_dict.concepts[concept.scheme].values()
        for code, (meaning, _cids) in by_code.items()
        if code == concept.code
    }
    assert meanings, f"{concept} is not in PS3.16"
    assert concept.meaning.lower() in meanings


def test_unverified_findings_are_local_and_keep_their_label():
    for label in (
        "Cardiomegaly",
        "Atelectasis",
        "Pneumonia",
        "Consolidation",
        "Emphysema",
        "Pleural_Thickening",
        "Hernia",
    ):
        concept = codes.finding_concept(label)
        assert concept.scheme == codes.LOCAL and concept.code == label and not concept.standard
        assert concept.fhir_system == codes.LOCAL_SYSTEM
    assert codes.finding_concept("Effusion") == codes.Concept("SCT", "60046008", "Pleural effusion")
    assert codes.finding_concept("infiltration").scheme == "DCM"


def test_measurement_names_map_to_quantity_site_and_laterality():
    left = codes.measurement_concept("left_lung_area")
    assert (left.quantity, left.site, left.laterality) == (codes.AREA, codes.ANATOMY["lung"], codes.LATERALITY["left"])
    heart = codes.measurement_concept("heart_width_mm")
    assert (heart.quantity, heart.site, heart.laterality) == (codes.WIDTH, codes.ANATOMY["heart"], None)
    assert codes.measurement_concept("cardiothoracic_ratio").quantity == codes.CARDIOTHORACIC_RATIO
    with pytest.raises(ValueError):
        codes.measurement_concept("spleen_volume")
    with pytest.raises(ValueError):
        codes.unit_concept("furlong")
