"""The coded concepts of the results, shared by the DICOM SR and the FHIR resources so both say the same thing.

Standard codes are used only where the concept is published in DICOM PS3.16 (as shipped in pydicom's
concept dictionary, so each one below is checked against it in tests/unit/test_dicom_codes.py):

| finding (NIH ChestX-ray14 label) | code |
|---|---|
| Effusion | SNOMED CT 60046008 "Pleural effusion" |
| Mass | SNOMED CT 4147007 "Mass" |
| Nodule | SNOMED CT 27925004 "Nodule" |
| Pneumothorax | SNOMED CT 36118008 "Pneumothorax" |
| Edema | SNOMED CT 19242006 "Pulmonary edema" |
| Fibrosis | SNOMED CT 112674009 "Fibrosis" |
| Infiltration | DICOM DCM 112121 "Infiltrate" |
| Cardiomegaly, Atelectasis, Pneumonia, Consolidation, Emphysema, Pleural_Thickening, Hernia, others | local |

Local: code system ``99CXR`` in DICOM, `LOCAL_SYSTEM` in FHIR; the code is the label.

Atelectasis, Pneumonia, Consolidation, Emphysema, Pleural thickening and (hiatal) Hernia have SNOMED CT
concepts, but not in PS3.16 (only narrower ones, e.g. "Plate-like atelectasis", "Mediastinal emphysema"),
so they stay local until a terminologist maps them rather than carry a code nobody here verified.
Cardiomegaly too: PS3.16 lists its code 287272002 under two meanings ("Cardiomegaly" and "Enlarged septal
foramen of heart"), so that code is ambiguous.

Measurements: ``<part>_area`` is SNOMED CT 42798000 "Area" and ``<part>_width`` SNOMED CT 103355008 "Width",
each with the anatomy as finding site (Heart 80891009, Lung 39607008, Clavicle 51299004, Mediastinum
72410000, Thorax 816094009) and laterality (Left 7771000, Right 24028007) from a left_/right_ prefix.
The radiographic cardiothoracic ratio (a ratio of widths) has no PS3.16 concept (LOINC 59076-0 is the
fetal cardiothoracic *area* ratio), so it is local. Probability is DCM 122157, threshold DCM 122411,
presence SNOMED CT 52101004 "Present" / 272519000 "Absent", the procedure SNOMED CT 168537006 "Plain
radiography". Units are UCUM.
"""

from __future__ import annotations

from dataclasses import dataclass

SCT = "SCT"
DCM = "DCM"
UCUM = "UCUM"
LOCAL = "99CXR"

FHIR_SYSTEMS = {
    SCT: "http://snomed.info/sct",
    DCM: "http://dicom.nema.org/resources/ontology/DCM",
    UCUM: "http://unitsofmeasure.org",
    "LN": "http://loinc.org",
}
# FHIR URI of the local code system (findings without a verified standard code, the CTR).
LOCAL_SYSTEM = "urn:cxr:codesystem:results"
FHIR_SYSTEMS[LOCAL] = LOCAL_SYSTEM


@dataclass(frozen=True)
class Concept:
    """A coded concept: DICOM coding scheme designator, code value, meaning."""

    scheme: str
    code: str
    meaning: str

    @property
    def fhir_system(self) -> str:
        return FHIR_SYSTEMS[self.scheme]

    @property
    def standard(self) -> bool:
        return self.scheme != LOCAL


FINDINGS: dict[str, Concept] = {
    "effusion": Concept(SCT, "60046008", "Pleural effusion"),
    "mass": Concept(SCT, "4147007", "Mass"),
    "nodule": Concept(SCT, "27925004", "Nodule"),
    "pneumothorax": Concept(SCT, "36118008", "Pneumothorax"),
    "edema": Concept(SCT, "19242006", "Pulmonary edema"),
    "fibrosis": Concept(SCT, "112674009", "Fibrosis"),
    "infiltration": Concept(DCM, "112121", "Infiltrate"),
}
ANATOMY: dict[str, Concept] = {
    "heart": Concept(SCT, "80891009", "Heart"),
    "lung": Concept(SCT, "39607008", "Lung"),
    "left_lung": Concept(SCT, "39607008", "Lung"),
    "right_lung": Concept(SCT, "39607008", "Lung"),
    "lungs": Concept(SCT, "39607008", "Lung"),
    "clavicle": Concept(SCT, "51299004", "Clavicle"),
    "left_clavicle": Concept(SCT, "51299004", "Clavicle"),
    "right_clavicle": Concept(SCT, "51299004", "Clavicle"),
    "mediastinum": Concept(SCT, "72410000", "Mediastinum"),
    "thorax": Concept(SCT, "816094009", "Thorax"),
}
LATERALITY: dict[str, Concept] = {
    "left": Concept(SCT, "7771000", "Left"),
    "right": Concept(SCT, "24028007", "Right"),
}
AREA = Concept(SCT, "42798000", "Area")
WIDTH = Concept(SCT, "103355008", "Width")
CARDIOTHORACIC_RATIO = Concept(LOCAL, "cardiothoracic_ratio", "Cardiothoracic ratio")
PROBABILITY = Concept(DCM, "122157", "Probability")
THRESHOLD = Concept(DCM, "122411", "Threshold Value")
PRESENT = Concept(SCT, "52101004", "Present")
ABSENT = Concept(SCT, "272519000", "Absent")
COMMENT = Concept(DCM, "121106", "Comment")
PLAIN_RADIOGRAPHY = Concept(SCT, "168537006", "Plain radiography")

UNITS: dict[str, Concept] = {
    "1": Concept(UCUM, "1", "no units"),
    "ratio": Concept(UCUM, "1", "no units"),
    "mm": Concept(UCUM, "mm", "mm"),
    "mm2": Concept(UCUM, "mm2", "square millimeter"),
    "px": Concept(UCUM, "{pixels}", "pixels"),
    "px2": Concept(UCUM, "{pixels}", "pixels"),
}


def finding_concept(label: str) -> Concept:
    """The finding's standard concept, or a local one whose code is the label."""
    key = label.strip().lower().replace(" ", "_")
    return FINDINGS.get(key) or Concept(LOCAL, label.strip() or "finding", label.strip().replace("_", " ") or "finding")


@dataclass(frozen=True)
class MeasurementConcept:
    """What a measurement name means: the quantity, and the anatomy (with laterality) it refers to."""

    quantity: Concept
    site: Concept | None = None
    laterality: Concept | None = None


def measurement_concept(name: str) -> MeasurementConcept:
    """``cardiothoracic_ratio``, ``<anatomy>_area`` or ``<anatomy>_width``; anything else raises ValueError."""
    key = name.strip().lower().removesuffix("_mm").removesuffix("_px")
    if key in ("cardiothoracic_ratio", "ctr"):
        return MeasurementConcept(CARDIOTHORACIC_RATIO)
    for suffix, quantity in (("_area", AREA), ("_width", WIDTH)):
        if key.endswith(suffix):
            part = key.removesuffix(suffix)
            site = ANATOMY.get(part)
            if site is None:
                break
            side = part.split("_", 1)[0]
            return MeasurementConcept(quantity, site, LATERALITY.get(side))
    raise ValueError(f"measurement {name!r}: no concept for it (cardiothoracic_ratio, <anatomy>_area, <anatomy>_width)")


def unit_concept(unit: str) -> Concept:
    try:
        return UNITS[unit.strip()]
    except KeyError:
        raise ValueError(f"unit {unit!r} is not one of {sorted(UNITS)}") from None
