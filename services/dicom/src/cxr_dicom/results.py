"""Plain result types the DICOM node turns into SR, SEG and FHIR, so those builders never depend on gRPC types."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"


@dataclass(frozen=True)
class Algorithm:
    """The model that produced results; ``checkpoint_hash`` identifies its weights (and the device UID)."""

    name: str
    version: str
    checkpoint_hash: str
    untrained: bool = False
    manufacturer: str = "cxr"
    model_card: str = ""  # where the model card of this version is served (the gateway's REST path); "" if none


@dataclass(frozen=True)
class Finding:
    """One classifier output: the label, its probability, the operating threshold and the decision."""

    label: str
    probability: float
    threshold: float
    positive: bool


@dataclass(frozen=True)
class Measurement:
    """One measurement, e.g. ``cardiothoracic_ratio`` (unit ``1``) or ``heart_area`` (unit ``mm2``)."""

    name: str
    value: float
    unit: str


@dataclass(frozen=True)
class AlgorithmResult:
    """What one algorithm said about one image."""

    algorithm: Algorithm
    findings: Sequence[Finding] = field(default_factory=tuple)
    measurements: Sequence[Measurement] = field(default_factory=tuple)


def any_untrained(results: Sequence[AlgorithmResult]) -> bool:
    return any(r.algorithm.untrained for r in results)


def untrained_notice(results: Sequence[AlgorithmResult]) -> str:
    """The sentence every output carries when a model is untrained (empty otherwise)."""
    names = sorted({r.algorithm.name for r in results if r.algorithm.untrained})
    if not names:
        return ""
    return f"{NOT_FOR_DIAGNOSTIC_USE}: {', '.join(names)} untrained (weights not from a trained checkpoint)"
