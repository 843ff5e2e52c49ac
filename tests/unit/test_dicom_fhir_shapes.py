"""cxr_dicom.fhir.build_bundle validates the first bundle of each shape with fhir.resources and the next ones of that
shape only where their values differ (finite numbers, DICOM UIDs): every bundle it returns still validates in full,
and a value outside those rules goes through the full validation."""

from __future__ import annotations

import math

import pydicom
import pytest

from cxr_dicom import fhir
from cxr_dicom.fhir import build_bundle, validate_bundle
from cxr_dicom.results import AlgorithmResult, Finding, Measurement
from tests.support.dicom_results import A_RESULTS, B_RESULTS, served_results
from tests.support.paths import DICOM_DIR

SEEDS = range(4)
SUBJECTS = (None, {"reference": "Patient/123"})


@pytest.fixture
def full_validations(monkeypatch) -> list[int]:
    """The full validations build_bundle runs (from an empty set of validated shapes)."""
    monkeypatch.setattr(fhir, "_VALIDATED_SHAPES", set(), raising=False)
    calls: list[int] = []
    real = fhir.validate_bundle

    def counted(bundle):
        calls.append(1)
        return real(bundle)

    monkeypatch.setattr(fhir, "validate_bundle", counted)
    return calls


def sources() -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(DICOM_DIR.glob("*.dcm"))]


def test_every_bundle_of_every_shape_validates_in_full_though_each_shape_was_validated_once(full_validations):
    """Every shared radiograph with served-shaped results (binary and 14-finding classifiers, a U-Net's measurements
    in mm, px and ratios, trained or not, with a model card or not), other models and a subject or none."""
    built = 0
    shapes = set()
    for source in sources():
        for seed in SEEDS:
            for results in (served_results(seed), A_RESULTS, B_RESULTS):
                for subject in SUBJECTS:
                    bundle = build_bundle(source, results, subject=subject)
                    validate_bundle(bundle)  # what the cache skipped holds
                    built += 1
                    shapes.add((repr(results), repr(subject), "Positive findings" in str(bundle)))
    assert len(full_validations) == len(shapes) < built / 3


def test_a_value_outside_the_plain_rules_goes_through_the_full_validation(full_validations):
    source = sources()[0]
    build_bundle(source, A_RESULTS)
    build_bundle(source, A_RESULTS)
    assert len(full_validations) == 1
    odd = pydicom.Dataset()
    odd.StudyInstanceUID, odd.SeriesInstanceUID, odd.SOPInstanceUID = "1.2.x", "1.2.3", "1.2.4"
    build_bundle(odd, A_RESULTS)  # a UID that is not one: validated (a FHIR string takes it)
    assert len(full_validations) == 2
    first, second = A_RESULTS
    for bad in (math.nan, math.inf):
        results = (
            AlgorithmResult(first.algorithm, (Finding("Effusion", bad, 0.5, True), *first.findings[1:])),
            AlgorithmResult(
                second.algorithm, (), (Measurement("cardiothoracic_ratio", bad, "1"), *second.measurements[1:])
            ),
        )
        try:
            bundle = build_bundle(source, results)
        except ValueError:
            continue  # fhir.resources refuses it, as it would without the shapes
        validate_bundle(bundle)
    assert len(full_validations) == 4
