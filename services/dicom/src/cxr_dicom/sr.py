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
- every group carries the TID 4019 Algorithm Identification (name, version, and as parameters the weights id
  the service reports, ``weights_id=``, the untrained flag and, when the service serves one, the model card's
  REST path, e.g. ``model_card=/v1/classification/models/<name>@<version>/card``).

Codes are in `cxr_dicom.codes`. When any model is untrained the SR says "NOT FOR DIAGNOSTIC USE" where a
viewer shows it: the series description, a TEXT "Comment" item right after the report's Language of Content
Item (TID 1500 row order), and the contribution description of that model's equipment item.

Contributing Equipment (0018,A001), as IHE AI Results asks for each algorithm: manufacturer, model name,
software versions (the model's version, its weights id when different, and the node's ``cxr-dicom`` version),
a Device UID (0018,1002) derived from the model name and weights id (the same weights always give the same
UID; other weights another one), and the purpose of reference. IHE's "Processing Algorithm" is not a code of
DICOM CID 7005 (Contributing Equipment Purpose of Reference), which highdicom enforces; the CID 7005 code for
it is (109102, DCM, "Processing Equipment") (109104 is "De-identifying Equipment").
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import struct
import uuid
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, cast

import highdicom as hd
from pydicom import DataElement, Dataset, config, dcmread
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DS, DSfloat

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
LANGUAGE_OF_CONTENT = ("DCM", "121049")  # Language of Content Item and Descendants
IMAGING_MEASUREMENTS = ("DCM", "126010")
try:
    NODE_VERSION = importlib.metadata.version("cxr-dicom")
except importlib.metadata.PackageNotFoundError:  # run from a source tree without the package installed
    NODE_VERSION = "unknown"
SERIES_DESCRIPTION = "cxr AI results"
MANUFACTURER = "cxr"


def _is_concept(item: Dataset | None, code: tuple[str, str]) -> bool:
    names = (item.get("ConceptNameCodeSequence") if item is not None else None) or []
    return bool(names) and (str(names[0].CodingSchemeDesignator), str(names[0].CodeValue)) == code


def _coded(concept: Concept) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=concept.code, scheme_designator=concept.scheme, meaning=concept.meaning)


def device_uid(algorithm: Algorithm) -> str:
    """A UID fixed by the model name and checkpoint hash: ``2.25.`` + a name-based (SHA-1) UUID of both, as
    PS3.5 B.2 derives UIDs from UUIDs."""
    name = f"urn:cxr:algorithm:{algorithm.name}:{algorithm.checkpoint_hash}"
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, name).int}"


def _algorithm_fields(algorithm: Algorithm) -> tuple[str, str, list[str]]:
    """TID 4019 Algorithm Identification: name, version and parameters."""
    parameters = [
        f"weights_id={algorithm.checkpoint_hash}",
        f"untrained={str(algorithm.untrained).lower()}",
        *([f"model_card={algorithm.model_card}"] if algorithm.model_card else []),
    ]
    return algorithm.name[:64], algorithm.version[:64] or "unknown", parameters


def software_versions(algorithm: Algorithm) -> list[str]:
    """The model's version, its weights id when that says something else, and the node's own version (it built
    the object)."""
    versions = [algorithm.version[:64] or "unknown"]
    if algorithm.checkpoint_hash and algorithm.checkpoint_hash != algorithm.version:
        versions.append(algorithm.checkpoint_hash[:64])
    versions.append(f"cxr-dicom {NODE_VERSION}"[:64])
    return versions


def algorithm_identity(results: Sequence[AlgorithmResult]) -> list[str]:
    """What fixes a result object's identity besides its source (DICOM UIDs, FHIR identifiers): each algorithm's
    device UID (name and weights), version and operating thresholds, so new weights, a new version or new
    thresholds (other decisions) give new objects, and a retry the same ones."""
    return [f"{device_uid(r.algorithm)}@{r.algorithm.version}{_thresholds(r)}" for r in results]


def _thresholds(result: AlgorithmResult) -> str:
    if not result.findings:
        return ""
    pairs = sorted(f"{f.label}={f.threshold!r}" for f in result.findings)
    return "#" + hashlib.sha256(";".join(pairs).encode()).hexdigest()[:16]


def contributing_equipment(algorithm: Algorithm) -> hd.ContributingEquipment:
    """The IHE AI Results Contributing Equipment item for one algorithm."""
    item = hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer[:64],
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.name[:64],
        software_versions=software_versions(algorithm),
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


# The TID 1501 measurement groups, the bulk of the SR, are built as light items (``Item``: tag -> (VR, value)) and
# encoded straight to bytes, or turned into plain pydicom items where bytes will not do: the same items highdicom's
# MeasurementsAndQualitativeEvaluations builds (tests/unit/test_dicom_sr_fast_path.py compares them), without its
# per-item checks and concept hashing, nor pydicom's per-element bookkeeping.
Item = dict[int, tuple[str, Any]]
_CONCEPT_NAME = 0x0040A043
_CONCEPT_CODE = 0x0040A168
_RELATIONSHIP = 0x0040A010
_VALUE_TYPE = 0x0040A040
CONTAINS, HAS_OBS_CONTEXT, HAS_CONCEPT_MOD = "CONTAINS", "HAS OBS CONTEXT", "HAS CONCEPT MOD"
MEASUREMENT_GROUP = Concept("DCM", "125007", "Measurement Group")
TRACKING_IDENTIFIER = Concept("DCM", "112039", "Tracking Identifier")
TRACKING_UID = Concept("DCM", "112040", "Tracking Unique Identifier")
FINDING = Concept("DCM", "121071", "Finding")
ALGORITHM_NAME = Concept("DCM", "111001", "Algorithm Name")
ALGORITHM_VERSION = Concept("DCM", "111003", "Algorithm Version")
ALGORITHM_PARAMETERS = Concept("DCM", "111002", "Algorithm Parameters")
SOURCE_OF_MEASUREMENT = Concept("DCM", "121112", "Source of Measurement")
FINDING_SITE = Concept("SCT", "363698007", "Finding Site")
LATERALITY = Concept("SCT", "272741003", "Laterality")


def _put(item: Item, tag: int, vr: str, value: Any) -> None:
    item[tag] = (vr, value)


def _to_dataset(item: Item) -> Dataset:
    """The pydicom item of a light item, without pydicom's value checks (the node's own codes, text and numbers)."""
    ds = Dataset()
    for tag, (vr, value) in item.items():
        if vr == "SQ":
            value = [_to_dataset(child) for child in value]
        ds.add(DataElement(tag, vr, value, validation_mode=config.IGNORE))
    return ds


@functools.cache
def _code(concept: Concept) -> Item:
    """A Code Sequence item as ``hd.sr.CodedConcept`` makes it (a code over 16 characters is a long or URN code),
    made once per concept and shared, as highdicom shares an algorithm's identification items between groups."""
    item: Item = {}
    value = concept.code
    if len(value) > 16:
        if value.startswith("urn") or "://" in value:
            _put(item, 0x00080120, "UR", value)  # URN Code Value
        else:
            _put(item, 0x00080119, "UC", value)  # Long Code Value
    else:
        _put(item, 0x00080100, "SH", value)  # Code Value
    if len(concept.meaning) > 64:
        raise ValueError("Code meaning can have maximally 64 characters.")
    _put(item, 0x00080102, "SH", concept.scheme)  # Coding Scheme Designator
    _put(item, 0x00080104, "LO", concept.meaning)  # Code Meaning
    return item


def _content_item(value_type: str, name: Concept, relationship: str) -> Item:
    item: Item = {}
    _put(item, _RELATIONSHIP, "CS", relationship)
    _put(item, _VALUE_TYPE, "CS", value_type)
    _put(item, _CONCEPT_NAME, "SQ", [_code(name)])
    return item


def _text_item(name: Concept, value: str, relationship: str) -> Item:
    item = _content_item("TEXT", name, relationship)
    _put(item, 0x0040A160, "UT", value)  # Text Value
    return item


def _code_item(name: Concept, value: Concept, relationship: str) -> Item:
    item = _content_item("CODE", name, relationship)
    _put(item, _CONCEPT_CODE, "SQ", [_code(value)])
    return item


def _num_item(name: Concept, value: float, unit: Concept, sites: Sequence[Item] = ()) -> Item:
    item = _content_item("NUM", name, CONTAINS)
    measured: Item = {}
    _put(measured, 0x004008EA, "SQ", [_code(unit)])  # Measurement Units Code Sequence
    _put(measured, 0x0040A161, "FD", value)  # Floating Point Value
    _put(measured, 0x0040A30A, "DS", DS(value, auto_format=True))  # Numeric Value
    _put(item, 0x0040A300, "SQ", [measured])  # MeasuredValueSequence
    if sites:
        _put(item, _CONTENT_SEQUENCE, "SQ", list(sites))
    return item


def _algorithm_items(algorithm: Algorithm) -> list[Item]:
    """TID 4019 Algorithm Identification, the items ``_algorithm_identification`` gives highdicom."""
    name, version, parameters = _algorithm_fields(algorithm)
    items = [
        _text_item(ALGORITHM_NAME, name, HAS_CONCEPT_MOD),
        _text_item(ALGORITHM_VERSION, version, HAS_CONCEPT_MOD),
    ]
    items.extend(_text_item(ALGORITHM_PARAMETERS, p, HAS_CONCEPT_MOD) for p in parameters)
    return items


def _tracking_uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def _group(identifier: str, body: Sequence[Item], source: Dataset) -> Item:
    """A TID 1501 Measurement Group container: tracking identifier and a new tracking UID, ``body``, the source."""
    group = _content_item("CONTAINER", MEASUREMENT_GROUP, CONTAINS)
    _put(group, 0x0040A050, "CS", "CONTINUOUS")  # Continuity Of Content
    template: Item = {}
    _put(template, 0x00080105, "CS", "DCMR")  # Mapping Resource
    _put(template, 0x0040DB00, "CS", "1501")  # Template Identifier
    _put(group, 0x0040A504, "SQ", [template])  # Content Template Sequence
    tracking_uid = _content_item("UIDREF", TRACKING_UID, HAS_OBS_CONTEXT)
    _put(tracking_uid, 0x0040A124, "UI", _tracking_uid())
    image = _content_item("IMAGE", SOURCE_OF_MEASUREMENT, CONTAINS)
    reference: Item = {}
    _put(reference, 0x00081150, "UI", str(source.SOPClassUID))  # Referenced SOP Class UID
    _put(reference, 0x00081155, "UI", str(source.SOPInstanceUID))  # Referenced SOP Instance UID
    _put(image, 0x00081199, "SQ", [reference])  # Referenced SOP Sequence
    items = [_text_item(TRACKING_IDENTIFIER, identifier[:64], HAS_OBS_CONTEXT), tracking_uid, *body, image]
    _put(group, _CONTENT_SEQUENCE, "SQ", items)
    return group


def measurement_groups(source: Dataset, results: Sequence[AlgorithmResult]) -> list[Dataset]:
    """The TID 1501 groups as pydicom items (`light_groups`)."""
    return [_to_dataset(group) for group in light_groups(source, results)]


def group_sequence(source: Dataset, results: Sequence[AlgorithmResult]) -> DataElement | RawDataElement:
    """The Imaging Measurements' Content Sequence: the groups already encoded (explicit VR little endian) as a raw
    element, which pydicom writes as it is and parses only if read; pydicom items if they hold text
    `_encoded_items` does not cover."""
    groups = light_groups(source, results)
    raw = _encoded_items(groups)
    if raw is None:
        return DataElement(_CONTENT_SEQUENCE, "SQ", [_to_dataset(group) for group in groups])
    return RawDataElement(BaseTag(_CONTENT_SEQUENCE), "SQ", len(raw), raw, 0, False, True)


def light_groups(source: Dataset, results: Sequence[AlgorithmResult]) -> list[Item]:
    """One TID 1501 group per finding of each result, and one with a result's measurements, all referencing
    ``source``; an algorithm's identification items are shared by its groups."""
    groups: list[Item] = []
    for result in results:
        algorithm = _algorithm_items(result.algorithm)
        groups.extend(_finding_group(result, i, source, algorithm) for i in range(len(result.findings)))
        if result.measurements:
            groups.append(_measurement_group(result, source, algorithm))
    return groups


@functools.cache
def _placeholder_group() -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """highdicom's Measurement Report wants one group; its Imaging Measurements are then replaced."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(identifier="placeholder", uid="2.25.0")
    )


def _finding_group(result: AlgorithmResult, finding_index: int, source: Dataset, algorithm: list[Item]) -> Item:
    finding = result.findings[finding_index]
    concept = finding_concept(finding.label)
    no_units = unit_concept("1")
    body = [
        _code_item(FINDING, concept, CONTAINS),
        *algorithm,
        _num_item(PROBABILITY, float(finding.probability), no_units),
        _num_item(THRESHOLD, float(finding.threshold), no_units),
        _code_item(concept, PRESENT if finding.positive else ABSENT, CONTAINS),
    ]
    return _group(f"{result.algorithm.name}/{finding.label}", body, source)


def _measurement_group(result: AlgorithmResult, source: Dataset, algorithm: list[Item]) -> Item:
    body = list(algorithm)
    for m in result.measurements:
        meaning = measurement_concept(m.name)
        sites = []
        if meaning.site is not None:
            site = _code_item(FINDING_SITE, meaning.site, HAS_CONCEPT_MOD)
            if meaning.laterality is not None:
                _put(site, _CONTENT_SEQUENCE, "SQ", [_code_item(LATERALITY, meaning.laterality, HAS_CONCEPT_MOD)])
            sites.append(site)
        body.append(_num_item(meaning.quantity, float(m.value), unit_concept(m.unit), sites))
    return _group(f"{result.algorithm.name}/measurements", body, source)


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
        imaging_measurements=[_placeholder_group()],
    )
    imaging = report[0].ContentSequence[-1]  # TID 1500 row 6, Imaging Measurements: the groups go in here
    if not _is_concept(imaging, IMAGING_MEASUREMENTS):
        raise AssertionError("highdicom's Measurement Report does not end with its Imaging Measurements")
    groups = group_sequence(source, results)
    raw = isinstance(groups, RawDataElement)
    # encoded groups go in once the SR is built (its constructor and `_mark_encoded_as_written` would parse them)
    imaging[_CONTENT_SEQUENCE] = DataElement(_CONTENT_SEQUENCE, "SQ", []) if raw else groups
    notice = untrained_notice(results)
    if notice:
        content = report[0].ContentSequence
        language = [i for i, item in enumerate(content) if _is_concept(item, LANGUAGE_OF_CONTENT)]
        content.insert(  # TID 1500 row order: Language of Content Item (row 1) comes first
            language[0] + 1 if language else 0,
            hd.sr.TextContentItem(
                name=_coded(COMMENT), value=notice[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            ),
        )
    with warnings.catch_warnings():
        # highdicom warns about person names and quotes them: keep patient data out of the logs.
        warnings.simplefilter("ignore", UserWarning)
        sr = _comprehensive_sr(
            evidence=[_source_header(source)],
            content=cast(hd.sr.ContainerContentItem, report[0]),
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
    if raw:
        built = sr.ContentSequence[-1]
        if sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian:
            built[_CONTENT_SEQUENCE] = groups
        else:  # raw groups are explicit VR little endian: parsed for any other encoding
            built[_CONTENT_SEQUENCE] = DataElement(_CONTENT_SEQUENCE, "SQ", _parsed(cast(RawDataElement, groups)))
    return sr


def _parsed(raw: RawDataElement) -> list[Dataset]:
    return list(convert_raw_data_element(raw).value)


_CONTENT_SEQUENCE = 0x0040A730


def _comprehensive_sr(*, content: hd.sr.ContainerContentItem, **kwargs: Any) -> hd.sr.ComprehensiveSR:
    """``hd.sr.ComprehensiveSR(content=content, **kwargs)`` without re-parsing a deep copy of the whole tree.

    highdicom's constructor deep-copies the tree, parses the copy back into content items and walks it twice
    (image references against the evidence, no SCOORD3D), yet the SR carries ``content``'s own tree: here it
    gets the root with only its top-level leaf items, and the root's full Content Sequence element goes in
    after, as the constructor would have copied it. The skipped walks' checks hold by construction: every
    group references only the source, which is the evidence, and nothing here builds SCOORD3D items.
    """
    full = content[_CONTENT_SEQUENCE]
    top = Dataset()
    for element in content:
        if element.tag != _CONTENT_SEQUENCE:
            top.add(element)
    top.ContentSequence = [item for item in full.value if "ContentSequence" not in item]
    sr = hd.sr.ComprehensiveSR(content=top, **kwargs)
    sr[_CONTENT_SEQUENCE] = full
    sr._content = hd.sr.ContentSequence([content], is_root=True)
    _mark_encoded_as_written(sr)
    return sr


def _mark_encoded_as_written(sr: Dataset) -> None:
    """Give every item below the SR's root the encoding the SR is written in, so pydicom's writer corrects
    ambiguous VRs once, from the root (its correction recurses into every sequence), instead of again for
    each nested item at each level (quadratic in the depth of the content tree)."""
    little_endian = sr.file_meta.TransferSyntaxUID.is_little_endian
    implicit = sr.file_meta.TransferSyntaxUID.is_implicit_VR
    stack = [item for element in sr if element.VR == "SQ" for item in element.value]
    while stack:
        item = stack.pop()
        # the writer compares this with the item's character set; another encoding just corrects as before
        item.set_original_encoding(implicit, little_endian, item._character_set)
        stack.extend(child for element in item if element.VR == "SQ" for child in element.value)


def sr_bytes(sr: Dataset) -> bytes:
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encode_sr(sr: Dataset) -> bytes:
    """``sr_bytes(sr)``, with the TID 1501 groups (most of the SR's elements) encoded by `_encoded_items` and handed
    to pydicom's writer as the raw value of their sequence; an SR whose groups hold anything that encoder does not
    write as pydicom does (another transfer syntax, text that is not ASCII) goes through pydicom whole."""
    content = sr.get("ContentSequence") or []
    imaging = content[-1] if content else None
    syntax = sr.file_meta.TransferSyntaxUID
    if imaging is None or syntax != ExplicitVRLittleEndian or not _is_concept(imaging, IMAGING_MEASUREMENTS):
        return sr_bytes(sr)
    element = imaging.get_item(_CONTENT_SEQUENCE)  # as it is: a raw element stays unparsed
    if isinstance(element, RawDataElement):
        groups = element
    else:
        encoded = _encoded_items(element.value)
        if encoded is None:
            return sr_bytes(sr)
        groups = RawDataElement(BaseTag(_CONTENT_SEQUENCE), "SQ", len(encoded), encoded, 0, False, True)
    imaging[_CONTENT_SEQUENCE] = groups
    (implicit, little_endian), charset = sr.original_encoding, sr.original_character_set
    # as written: pydicom's ambiguous-VR pass would parse the raw groups back (below the root every item is
    # marked so already, `_mark_encoded_as_written`); an ambiguous VR it would have corrected makes the write fail
    sr.set_original_encoding(False, True, sr._character_set)
    try:
        return sr_bytes(sr)
    except ValueError:
        sr.set_original_encoding(implicit, little_endian, charset)
        imaging[_CONTENT_SEQUENCE] = DataElement(_CONTENT_SEQUENCE, "SQ", _parsed(groups))
        return sr_bytes(sr)
    finally:
        sr.set_original_encoding(implicit, little_endian, charset)
        imaging[_CONTENT_SEQUENCE] = element


_TEXT_VRS = frozenset({"CS", "SH", "LO", "UI", "DS", "UC", "UR", "UT"})
_LONG_VRS = frozenset({"UC", "UR", "UT", "SQ"})  # explicit VR with a 4-byte length


def _encoded_items(items: Sequence[Dataset] | Sequence[Item], memo: dict[int, bytes] | None = None) -> bytes | None:
    """Sequence items (pydicom or light ones) in explicit VR little endian as pydicom writes them (defined lengths,
    even-padded values); None when an item holds a VR or value this does not cover. A light item shared between
    groups (a code, an algorithm's identification) is encoded once."""
    memo = {} if memo is None else memo
    out = bytearray()
    for item in items:
        body = memo.get(id(item)) if isinstance(item, dict) else None
        if body is None:
            body = _encoded_dataset(item, memo)
            if body is None:
                return None
            if isinstance(item, dict):
                memo[id(item)] = body
        out += b"\xfe\xff\x00\xe0" + struct.pack("<I", len(body)) + body
    return bytes(out)


def _elements(ds: Dataset | Item) -> Iterator[tuple[int, str, Any]]:
    if isinstance(ds, dict):
        for tag in sorted(ds):
            yield (tag, *ds[tag])
    else:
        for tag in sorted(ds.keys()):
            elem = ds[tag]
            yield tag, elem.VR, elem.value


def _encoded_dataset(ds: Dataset | Item, memo: dict[int, bytes]) -> bytes | None:
    out = bytearray()
    for tag, vr, value in _elements(ds):
        if vr == "SQ":
            payload = _encoded_items(value, memo)
            if payload is None:
                return None
        elif vr == "FD" and isinstance(value, float):
            payload = struct.pack("<d", value)
        elif vr in _TEXT_VRS and isinstance(value, (str, DSfloat)):
            text = str(value)
            if "\\" in text or not text.isascii():
                return None
            payload = text.encode("ascii")
            if len(payload) % 2:
                payload += b"\0" if vr == "UI" else b" "
        else:
            return None
        out += struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
        out += (b"\0\0" + struct.pack("<I", len(payload))) if vr in _LONG_VRS else struct.pack("<H", len(payload))
        out += payload
    return bytes(out)


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
