"""Algorithm results shaped as the services' and two hand-made sets, shared by the DICOM node's SR and FHIR tests."""

from __future__ import annotations

from cxr_dicom.results import Algorithm, AlgorithmResult, Finding, Measurement

A_RESULTS = (
    AlgorithmResult(
        Algorithm("densenet121-res224-nih", "1.2.0", "9f2c" * 16, untrained=True),
        (Finding("Effusion", 0.81, 0.5, True), Finding("Pleural_Thickening", 0.12, 0.35, False)),
    ),
    AlgorithmResult(
        Algorithm("cxr-unet-anatomy", "0.3.1", "a1b2" * 16),
        (),
        (Measurement("cardiothoracic_ratio", 0.47, "1"), Measurement("heart_area", 10234.5, "mm2")),
    ),
)
B_RESULTS = (
    AlgorithmResult(
        Algorithm("swin-nih", "7.0", "0c0d" * 16),
        (Finding("Mass", 0.2, 0.6, False), Finding("Nodule", 0.9, 0.3, True), Finding("Edema", 0.4, 0.4, True)),
    ),
    AlgorithmResult(
        Algorithm("unet-lungs", "2.1", "e5f6" * 16, untrained=True),
        (),
        (Measurement("left_lung_area", 20480.0, "mm2"), Measurement("thorax_width", 280.5, "mm")),
    ),
)
NIH_LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
VALUES = (0.0, 1.0, 0.5, 1e-7, 0.123456789012345, 0.999999999, 3.14159e-3, 0.33333333333333337)
MEASUREMENTS = (
    ("cardiothoracic_ratio", "1"), ("heart_width", "mm"), ("thorax_width", "px"), ("heart_area", "mm2"),
    ("left_lung_area", "mm2"), ("right_lung_area", "px2"), ("left_clavicle_area", "mm2"), ("mediastinum_area", "px2"),
)  # fmt: skip


def served_results(seed: int) -> tuple[AlgorithmResult, ...]:
    """Results shaped as the services' (a binary and a 14-finding classifier, a U-Net's measurements)."""
    value = lambda k: VALUES[(seed + k) % len(VALUES)] * (1 if k % 3 else 12345.678901234)  # noqa: E731
    return (
        AlgorithmResult(
            Algorithm("binary_classifier", f"v{seed}", f"{seed:x}" * 16, untrained=seed % 2 == 0, model_card="/v1/c"),
            (Finding("abnormal", value(1) % 1, 0.5, seed % 3 == 0),),
        ),
        AlgorithmResult(
            Algorithm("multiclass_classifier", "1.0", "c0ffee" * 10, untrained=seed % 2 == 1),
            tuple(Finding(label, value(i) % 1, value(i + 1) % 1, i % 2 == 0) for i, label in enumerate(NIH_LABELS)),
        ),
        AlgorithmResult(
            Algorithm("segmentation", "2", "2", untrained=True),
            (),
            tuple(Measurement(name, value(i), unit) for i, (name, unit) in enumerate(MEASUREMENTS)),
        ),
    )
