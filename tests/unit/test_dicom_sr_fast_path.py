"""cxr_dicom.sr.build_sr's fast ComprehensiveSR construction gives the SR highdicom's own constructor gives, for
different sources and models, and nothing of one study's SR turns up in the next one's."""

from __future__ import annotations

import itertools

import highdicom as hd
import pydicom
import pytest
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filebase import DicomBytesIO

from cxr_dicom import sr as sr_module
from cxr_dicom.codes import (
    ABSENT,
    PRESENT,
    PROBABILITY,
    THRESHOLD,
    finding_concept,
    measurement_concept,
    unit_concept,
)
from cxr_dicom.results import Algorithm, AlgorithmResult
from cxr_dicom.sr import build_sr, sr_bytes
from tests.support.dicom_results import A_RESULTS, B_RESULTS, NIH_LABELS, served_results
from tests.support.paths import DICOM_DIR

CONTENT_SEQUENCE = 0x0040A730
TRACKING_UID = "112040"  # DCM "Tracking Unique Identifier": a new random UID per group and build
CLOCK = ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime")

STUDIES = {
    "A": (DICOM_DIR / "nih-dx-mono2-8bit.dcm", A_RESULTS),
    "B": (DICOM_DIR / "siim-cxr-mono2-jpeg-baseline.dcm", B_RESULTS),
    **{path.stem: (path, served_results(i)) for i, path in enumerate(sorted(DICOM_DIR.glob("*.dcm")))},
}


def build(name: str) -> bytes:
    path, results = STUDIES[name]
    source = pydicom.dcmread(path)
    return sr_bytes(build_sr(source, results, series_instance_uid=f"2.25.{len(name)}1", sop_instance_uid="2.25.12"))


def straightforward(content, **kwargs):
    return hd.sr.ComprehensiveSR(content=content, **kwargs)


def normalized(data: bytes) -> dict:
    """The SR as DICOM JSON without what differs between two builds of the same results: the clock (creation
    and content date and time, the contribution time of the source's equipment) and the tracking UIDs (random
    per build)."""
    ds = pydicom.dcmread(DicomBytesIO(data))
    for keyword in CLOCK:
        assert keyword in ds
        delattr(ds, keyword)
    stamped = [item for item in ds.ContributingEquipmentSequence if "ContributionDateTime" in item]
    assert stamped  # highdicom's item for the source's equipment, stamped now
    for item in stamped:
        del item.ContributionDateTime
    tracking = 0

    def walk(items):
        nonlocal tracking
        for item in items:
            if item.ValueType == "UIDREF" and item.ConceptNameCodeSequence[0].CodeValue == TRACKING_UID:
                item.UID = "2.25.0"
                tracking += 1
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    assert tracking > 0
    meta = {str(e.tag): str(e.value) for e in ds.file_meta}
    return {"meta": meta, "dataset": ds.to_json_dict()}


def highdicom_groups(source, results):
    """The TID 1501 groups as highdicom's MeasurementsAndQualitativeEvaluations builds them."""
    ref = hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=str(source.SOPClassUID), referenced_sop_instance_uid=str(source.SOPInstanceUID)
    )

    def coded(concept):
        return hd.sr.CodedConcept(value=concept.code, scheme_designator=concept.scheme, meaning=concept.meaning)

    groups = []
    for result in results:
        name, version, parameters = sr_module._algorithm_fields(result.algorithm)
        algorithm_id = hd.sr.AlgorithmIdentification(name=name, version=version, parameters=parameters)
        no_units = coded(unit_concept("1"))
        for finding in result.findings:
            concept = coded(finding_concept(finding.label))
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        identifier=f"{result.algorithm.name}/{finding.label}"[:64], uid=hd.UID()
                    ),
                    finding_type=concept,
                    algorithm_id=algorithm_id,
                    source_images=[ref],
                    qualitative_evaluations=[
                        hd.sr.QualitativeEvaluation(name=concept, value=coded(PRESENT if finding.positive else ABSENT))
                    ],
                    measurements=[
                        hd.sr.Measurement(name=coded(PROBABILITY), value=float(finding.probability), unit=no_units),
                        hd.sr.Measurement(name=coded(THRESHOLD), value=float(finding.threshold), unit=no_units),
                    ],
                )
            )
        if result.measurements:
            measurements = []
            for m in result.measurements:
                meaning = measurement_concept(m.name)
                sites = None
                if meaning.site is not None:
                    laterality = coded(meaning.laterality) if meaning.laterality is not None else None
                    sites = [hd.sr.FindingSite(anatomic_location=coded(meaning.site), laterality=laterality)]
                measurements.append(
                    hd.sr.Measurement(
                        name=coded(meaning.quantity),
                        value=float(m.value),
                        unit=coded(unit_concept(m.unit)),
                        finding_sites=sites,
                    )
                )
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(identifier=f"{result.algorithm.name}/measurements"),
                    algorithm_id=algorithm_id,
                    source_images=[ref],
                    measurements=measurements,
                )
            )
    return [group[0] for group in groups]


@pytest.fixture
def reference(monkeypatch) -> dict[str, dict]:
    """Each study's SR through highdicom alone: its ComprehensiveSR constructor on the whole content tree, and
    its MeasurementsAndQualitativeEvaluations for the groups."""
    with monkeypatch.context() as patch:
        patch.setattr(sr_module, "_comprehensive_sr", straightforward)
        patch.setattr(
            sr_module, "group_sequence", lambda s, r: DataElement(CONTENT_SEQUENCE, "SQ", highdicom_groups(s, r))
        )
        return {name: normalized(build(name)) for name in STUDIES}


def test_the_fast_sr_equals_highdicoms_own_for_two_sources_and_models_in_any_order(reference):
    assert reference["A"] != reference["B"]
    a_first = build("A")
    b = build("B")
    a_again = build("A")
    assert normalized(a_first) == reference["A"]
    assert normalized(b) == reference["B"]
    assert normalized(a_again) == reference["A"]
    source_a = pydicom.dcmread(STUDIES["A"][0], stop_before_pixels=True)
    for value in (source_a.SOPInstanceUID, source_a.SeriesInstanceUID, source_a.StudyInstanceUID, "densenet121"):
        assert value.encode() in a_first and value.encode() not in b
    assert b"swin-nih" in b and b"swin-nih" not in a_again


def test_the_fast_sr_equals_highdicoms_own_for_every_shared_dicom_with_served_results(reference):
    """Every shared radiograph as the source, results shaped as the services' (14 findings, long local codes,
    measurements with sites, lateralities and pixel units), values down to 1e-7 and with 15 digits."""
    served = [name for name in STUDIES if name not in ("A", "B")]
    assert len(served) >= 6
    for name in served:
        built = normalized(build(name))
        assert built == reference[name], name
        groups = built["dataset"]["0040A730"]["Value"][-1]["0040A730"]["Value"]
        assert len(groups) == 1 + len(NIH_LABELS) + 1


def test_the_fast_srs_highdicom_content_is_the_tree_it_carries():
    path, results = STUDIES["B"]
    sr = build_sr(pydicom.dcmread(path), results)
    [root] = sr.content
    assert isinstance(root, hd.sr.ContainerContentItem)
    assert len(root.ContentSequence) == len(sr.ContentSequence) > 0
    assert all(a is b for a, b in zip(root.ContentSequence, sr.ContentSequence, strict=True))


def test_the_srs_fast_encoding_is_pydicoms_byte_for_byte_and_text_it_does_not_cover_goes_through_pydicom():
    """`encode_sr` (its groups encoded outside pydicom's writer) gives the bytes of `sr_bytes` for every study, and
    leaves the SR as it was; a non-ASCII algorithm name (not covered) still gives pydicom's bytes."""
    from cxr_dicom.sr import _encoded_items, encode_sr

    for name, (path, results) in STUDIES.items():
        sr = build_sr(pydicom.dcmread(path), results, series_instance_uid="2.25.1", sop_instance_uid="2.25.2")
        groups = sr.ContentSequence[-1].ContentSequence
        assert _encoded_items(groups) is not None, name  # the fast path is taken
        assert encode_sr(sr) == sr_bytes(sr), name
        assert sr.ContentSequence[-1].ContentSequence is groups  # the SR is unchanged
    path, results = STUDIES["A"]
    accented = (AlgorithmResult(Algorithm("réseau", "1", "1"), results[0].findings), *results[1:])
    sr = build_sr(pydicom.dcmread(path), accented)
    assert _encoded_items(sr.ContentSequence[-1].ContentSequence) is None
    assert encode_sr(sr) == sr_bytes(sr)


def test_the_srs_groups_go_in_encoded_as_pydicom_writes_the_same_groups_built_as_its_items(monkeypatch):
    """`build_sr` puts the groups in already encoded (a raw element, never parsed on the way out); with the same
    tracking UIDs, the SR's bytes equal pydicom's writing of the groups built as pydicom items, for every study."""
    from cxr_dicom.sr import encode_sr, group_sequence, measurement_groups

    counter = [itertools.count()]
    monkeypatch.setattr(sr_module, "_tracking_uid", lambda: f"2.25.{next(counter[0])}")
    for name, (path, results) in STUDIES.items():
        source = pydicom.dcmread(path)
        counter[0] = itertools.count()
        with monkeypatch.context() as patch:
            patch.setattr(
                sr_module, "group_sequence", lambda s, r: DataElement(CONTENT_SEQUENCE, "SQ", measurement_groups(s, r))
            )
            sr = build_sr(source, results, series_instance_uid="2.25.1", sop_instance_uid="2.25.2")
        slow = sr_bytes(sr)
        counter[0] = itertools.count()
        imaging = sr.ContentSequence[-1]
        imaging[CONTENT_SEQUENCE] = group_sequence(source, results)
        assert isinstance(imaging.get_item(CONTENT_SEQUENCE), RawDataElement), name
        assert encode_sr(sr) == slow, name
        built = build_sr(source, results)
        assert isinstance(built.ContentSequence[-1].get_item(CONTENT_SEQUENCE), RawDataElement), name
