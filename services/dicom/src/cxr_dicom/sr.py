"""The DICOM results a viewer and a report system read: a TID 1500 Comprehensive SR, and the IHE AI Results
Contributing Equipment Sequence for the SR and the SEG.

The SR (highdicom ``ComprehensiveSR``: a projection radiograph has no 3D coordinates) is a TID 1500
Measurement Report for one source image, referenced by its Study/Series/SOP Instance UIDs (the evidence
sequence) and, in every measurement group, by SOP Class/Instance UID. Per algorithm result:

- each finding is a TID 1501 group whose finding type is the finding's concept, with a qualitative
  evaluation (the finding: Present/Absent) and two measurements, the probability (DCM 122157) and the
  operating threshold (DCM 122411), both unit ``1``;
- the measurements (CTR, anatomy areas and widths) form one TID 1501 group, each with its UCUM unit and
  the anatomy as finding site;
- every group carries the TID 4019 Algorithm Identification (name, version, the checkpoint hash, the
  untrained flag and, when the service serves one, the model card's REST path as parameters, e.g.
  ``model_card=/v1/classification/models/<name>/card``).

Codes are in `cxr_dicom.codes`. When any model is untrained the SR says "NOT FOR DIAGNOSTIC USE" where a
viewer shows it: the series description, a TEXT "Comment" item at the top of the report content, and the
contribution description of that model's equipment item.

Contributing Equipment (0018,A001), as IHE AI Results asks for each algorithm: manufacturer, model name,
software versions (version and checkpoint hash), a Device UID (0018,1002) derived from the model name and
checkpoint hash (the same weights always give the same UID; other weights another one), and the purpose of
reference. IHE's "Processing Algorithm" is not a code of DICOM CID 7005 (Contributing Equipment Purpose of
Reference), which highdicom enforces; the CID 7005 code for it is (109102, DCM, "Processing Equipment")
(109104 is "De-identifying Equipment").
"""

from __future__ import annotations

import io
import uuid
import warnings
from collections.abc import Sequence
from typing import Any

import highdicom as hd
from pydicom import Dataset, dcmread
from pydicom.sr.codedict import codes

from cxr_dicom.codes import (
    ABSENT,
    COMMENT,
    PLAIN_RADIOGRAPHY,
    PRESENT,
    PROBABILITY,
    THRESHOLD,
    Concept,
    finding_concept,
    measurement_concept,
    unit_concept,
)
from cxr_dicom.results import NOT_FOR_DIAGNOSTIC_USE, Algorithm, AlgorithmResult, any_untrained, untrained_notice
from cxr_serving.dicom import fill_type2

SERIES_NUMBER = 9902
SERIES_DESCRIPTION = "cxr AI results"
MANUFACTURER = "cxr"


def _coded(concept: Concept) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=concept.code, scheme_designator=concept.scheme, meaning=concept.meaning)


def device_uid(algorithm: Algorithm) -> str:
    """A UID fixed by the model name and checkpoint hash: ``2.25.`` + a name-based (SHA-1) UUID of both, as
    PS3.5 B.2 derives UIDs from UUIDs."""
    name = f"urn:cxr:algorithm:{algorithm.name}:{algorithm.checkpoint_hash}"
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, name).int}"


def _algorithm_identification(algorithm: Algorithm) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name[:64],
        version=algorithm.version[:64] or "unknown",
        parameters=[
            f"checkpoint_sha256={algorithm.checkpoint_hash}",
            f"untrained={str(algorithm.untrained).lower()}",
            *([f"model_card={algorithm.model_card}"] if algorithm.model_card else []),
        ],
    )


def contributing_equipment(algorithm: Algorithm) -> hd.ContributingEquipment:
    """The IHE AI Results Contributing Equipment item for one algorithm."""
    item = hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer[:64],
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.name[:64],
        software_versions=[algorithm.version[:64] or "unknown", algorithm.checkpoint_hash[:64] or "unknown"],
        contribution_description=(
            f"AI analysis by {algorithm.name}"[:64]
            if not algorithm.untrained
            else f"{NOT_FOR_DIAGNOSTIC_USE}: untrained model"
        ),
    )
    item.DeviceUID = device_uid(algorithm)
    return item


def _source_header(source: Dataset) -> Dataset:
    """The source's header without pixel data (evidence needs identifiers, not pixels), type 2 gaps filled."""
    header = Dataset()
    for element in source:
        if element.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            header.add(element)
    if hasattr(source, "file_meta"):
        header.file_meta = source.file_meta
    fill_type2(header)
    return header


def _finding_group(
    result: AlgorithmResult, finding_index: int, source_ref: hd.sr.SourceImageForMeasurementGroup
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    finding = result.findings[finding_index]
    concept = _coded(finding_concept(finding.label))
    no_units = _coded(unit_concept("1"))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            identifier=f"{result.algorithm.name}/{finding.label}"[:64], uid=hd.UID()
        ),
        finding_type=concept,
        algorithm_id=_algorithm_identification(result.algorithm),
        source_images=[source_ref],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=concept, value=_coded(PRESENT if finding.positive else ABSENT))
        ],
        measurements=[
            hd.sr.Measurement(name=_coded(PROBABILITY), value=float(finding.probability), unit=no_units),
            hd.sr.Measurement(name=_coded(THRESHOLD), value=float(finding.threshold), unit=no_units),
        ],
    )


def _measurement_group(
    result: AlgorithmResult, source_ref: hd.sr.SourceImageForMeasurementGroup
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    measurements = []
    for m in result.measurements:
        meaning = measurement_concept(m.name)
        sites = []
        if meaning.site is not None:
            sites.append(
                hd.sr.FindingSite(
                    anatomic_location=_coded(meaning.site),
                    laterality=_coded(meaning.laterality) if meaning.laterality is not None else None,
                )
            )
        measurements.append(
            hd.sr.Measurement(
                name=_coded(meaning.quantity),
                value=float(m.value),
                unit=_coded(unit_concept(m.unit)),
                finding_sites=sites or None,
            )
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(identifier=f"{result.algorithm.name}/measurements"[:64]),
        algorithm_id=_algorithm_identification(result.algorithm),
        source_images=[source_ref],
        measurements=measurements,
    )


def build_sr(
    source: Dataset,
    results: Sequence[AlgorithmResult],
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.sr.ComprehensiveSR:
    """The TID 1500 Comprehensive SR of ``results`` about the image ``source`` (a pydicom Dataset)."""
    if not results:
        raise ValueError("an SR needs at least one algorithm result")
    source_ref = hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=str(source.SOPClassUID), referenced_sop_instance_uid=str(source.SOPInstanceUID)
    )
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    for result in results:
        groups.extend(_finding_group(result, i, source_ref) for i in range(len(result.findings)))
        if result.measurements:
            groups.append(_measurement_group(result, source_ref))
    first = results[0].algorithm
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(first), name=first.name[:64], manufacturer_name=first.manufacturer[:64]
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_coded(PLAIN_RADIOGRAPHY),
        imaging_measurements=groups,
    )
    notice = untrained_notice(results)
    if notice:
        report[0].ContentSequence.insert(
            0,
            hd.sr.TextContentItem(
                name=_coded(COMMENT), value=notice[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            ),
        )
    with warnings.catch_warnings():
        # highdicom warns about person names and quotes them: keep patient data out of the logs.
        warnings.simplefilter("ignore", UserWarning)
        sr = hd.sr.ComprehensiveSR(
            evidence=[_source_header(source)],
            content=report[0],
            series_instance_uid=series_instance_uid or hd.UID(),
            series_number=SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid or hd.UID(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            contributing_equipment=[contributing_equipment(r.algorithm) for r in results],
        )
    sr.SeriesDescription = (
        f"{SERIES_DESCRIPTION} - {NOT_FOR_DIAGNOSTIC_USE}" if any_untrained(results) else SERIES_DESCRIPTION
    )[:64]
    return sr


def sr_bytes(sr: Dataset) -> bytes:
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def add_contributing_equipment(ds: Dataset, results: Sequence[AlgorithmResult]) -> Dataset:
    """Append one Contributing Equipment item per algorithm to ``ds`` (e.g. a DICOM SEG), in place, and mark
    it not for diagnostic use in its series and content descriptions when a model is untrained."""
    items = list(ds.get("ContributingEquipmentSequence", []))
    known = {str(item.get("DeviceUID", "")) for item in items}
    for result in results:
        item = contributing_equipment(result.algorithm)
        if item.DeviceUID not in known:
            items.append(item)
            known.add(item.DeviceUID)
    ds.ContributingEquipmentSequence = items
    if any_untrained(results):
        description = str(ds.get("SeriesDescription", "") or "").strip()
        if NOT_FOR_DIAGNOSTIC_USE not in description:
            ds.SeriesDescription = f"{description} - {NOT_FOR_DIAGNOSTIC_USE}".strip(" -")[:64]
        if "ContentLabel" in ds or "ContentDescription" in ds or ds.get("Modality") == "SEG":
            ds.ContentDescription = untrained_notice(results)[:64]
    return ds


def add_contributing_equipment_to_bytes(data: bytes, results: Sequence[AlgorithmResult]) -> bytes:
    """`add_contributing_equipment` on an encoded DICOM file (the SEG bytes the segmentation service returns)."""
    ds = dcmread(io.BytesIO(data))
    add_contributing_equipment(ds, results)
    return sr_bytes(ds)


def read_sr(data: bytes) -> Any:
    """The SR as highdicom reads it back (``highdicom.sr.srread``)."""
    return hd.sr.srread(io.BytesIO(data))
