"""The load-time accuracy check: an optimised network against float32 torch on held-back images, with the
bounds of docs/model-runtimes.md (classification: probabilities and calls; segmentation: Dice of the masks)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class CheckResult:
    """Whether the optimised network may serve, its numbers (names as in the gauge) and, if not, why."""

    passed: bool
    numbers: dict[str, float] = field(default_factory=dict)
    why: str = ""

    def summary(self) -> str:
        return ", ".join(f"{k}={v:.4g}" for k, v in self.numbers.items())


# The bounds of docs/model-runtimes.md: a config may loosen them, and the load log then warns.
ISSUE_BOUNDS: dict[str, tuple[float, str]] = {
    "max_probability_delta": (0.02, "max"),
    "min_agreement": (0.99, "min"),
    "min_dice": (0.98, "min"),
}


def check_bounds(config: object) -> dict[str, float]:
    """The check bounds a runtime config carries (a classifier's or a segmenter's), by setting name."""
    return {k: float(getattr(config, k)) for k in ISSUE_BOUNDS if hasattr(config, k)}


def looser_than_issue(bounds: dict[str, float]) -> list[str]:
    """Each bound looser than the issue's, as 'name=value (issue: value)'."""
    out = []
    for name, value in bounds.items():
        issue, kind = ISSUE_BOUNDS[name]
        if (value > issue) if kind == "max" else (value < issue):
            out.append(f"{name}={value:g} (issue: {issue:g})")
    return out


def classification_check(
    reference: np.ndarray, got: np.ndarray, thresholds: np.ndarray, max_delta: float, min_agreement: float
) -> CheckResult:
    """N x L probabilities: max |Δp| ≤ max_delta, and for every label with a threshold (NaN: none) the share
    of images called the same (p ≥ threshold) ≥ min_agreement."""
    if reference.shape != got.shape:
        return CheckResult(False, {}, f"output shape {got.shape} differs from float32's {reference.shape}")
    if not np.isfinite(got).all():
        return CheckResult(False, {}, "non-finite probabilities")
    delta = float(np.abs(got - reference).max()) if got.size else 0.0
    with np.errstate(invalid="ignore"):
        same = (reference >= thresholds) == (got >= thresholds)
    judged = ~np.isnan(thresholds)
    agreement = same[:, judged].mean(axis=0) if judged.any() else np.ones(1)
    worst = float(agreement.min())
    numbers = {"max_abs_delta_p": delta, "min_call_agreement": worst}
    problems = []
    if delta > max_delta:
        problems.append(f"max |Δp| {delta:.4g} > {max_delta:g}")
    if worst < min_agreement:
        problems.append(f"a finding's call agreement {worst:.4g} < {min_agreement:g}")
    return CheckResult(not problems, numbers, "; ".join(problems))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1 when both are empty (they agree)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def segmentation_check(reference: np.ndarray, got: np.ndarray, classes: list[str], min_dice: float) -> CheckResult:
    """N x C x H x W logits: per class, the mean over images of the Dice of the masks (logit > 0) ≥ min_dice."""
    if reference.shape != got.shape:
        return CheckResult(False, {}, f"output shape {got.shape} differs from float32's {reference.shape}")
    if not np.isfinite(got).all():
        return CheckResult(False, {}, "non-finite logits")
    ref, out = reference > 0, got > 0
    per_class = {
        c: float(np.mean([dice(ref[i, k], out[i, k]) for i in range(ref.shape[0])])) for k, c in enumerate(classes)
    }
    worst_class = min(per_class, key=lambda c: per_class[c])
    worst = per_class[worst_class]
    numbers = {"min_class_dice": worst, "mean_dice": float(np.mean(list(per_class.values())))}
    if worst < min_dice:
        return CheckResult(False, numbers, f"mean Dice of class {worst_class} {worst:.4g} < {min_dice:g}")
    return CheckResult(True, numbers)
