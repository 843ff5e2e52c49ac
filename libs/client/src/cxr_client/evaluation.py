"""`cxr evaluate`: how a classification model, served, does on a labelled folder.

The images go through the public ClassifyImage RPC (bounded concurrency, `batch_process_images`), so
the numbers describe what the service serves: its preprocessing, its weights and its thresholds (each
Finding carries the threshold it was compared with). Per finding: AUROC with a stratified bootstrap
confidence interval from a seeded random generator, sensitivity and specificity at the served
threshold, and calibration (ECE over equal-width bins). A metric that needs a class the data lack
is `None` with the reason. `choose_thresholds` picks operating points from the same data
(`sensitivity=0.9` or `youden`) and `threshold_file` writes them for `cxr models load --thresholds`.
Metric definitions and file formats: docs/evaluate.md.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cxr_client.batch import batch_process_images
from cxr_client.client import AsyncCxrClient

NIH_IMAGE = "Image Index"
NIH_FINDINGS = "Finding Labels"
NO_FINDING = "No Finding"
NO_FINDING_COLUMN = "no_finding"
ABNORMAL = "abnormal"  # the binary classifier's label: any finding at all
IMAGE_COLUMNS = (NIH_IMAGE, "image", "Image", "filename", "file")
ECE_BINS = 10
DEFAULT_BOOTSTRAP = 1000
THRESHOLDS_SCHEMA = "cxr.thresholds.v1"
NOT_HELD_OUT = (
    "The chosen thresholds were picked on this same data and their sensitivity/specificity here were "
    "measured on it too, not on held-out data: expect lower numbers on new images."
)
REPORT_STATUS = (
    "NOT CLEARED FOR CLINICAL USE: not validated; the model is not a cleared medical device, and this report is a "
    "measurement on the data given, not a clinical validation"
)
UNTRAINED_NOTE = (
    "This model is UNTRAINED (random weights): these numbers describe an untrained model and say nothing "
    "about any trained checkpoint; AUROC near 0.5 is what chance gives."
)


@dataclass(frozen=True)
class LabelTable:
    """Ground truth: one row per image (file name), one 0/1 column per finding."""

    images: list[str]
    findings: list[str]
    truth: np.ndarray  # images x findings, int8
    source_format: str  # "nih" (Finding Labels) or "columns" (one 0/1 column per finding)


def read_labels(path: Path, findings: Sequence[str]) -> LabelTable:
    """The labels of `findings` from a CSV in the NIH `Finding Labels` format (`Image Index`, `Finding
    Labels` with `|` between findings, `No Finding`) or with one 0/1 column per finding. A finding a
    column file does not name is left out; the NIH format lists positives, so there it is negative, and a
    name there that is no label of the model (other than `No Finding`) is an error, as is a file naming none.
    `abnormal` (the binary model) is any finding: not `No Finding`, or 1 - `no_finding` in a column
    file without an `abnormal` column. Raises ValueError naming the row for a bad value."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
        header = list(rows[0].keys()) if rows else []
    if not rows:
        raise ValueError(f"{path}: no rows")
    image_col = next((c for c in IMAGE_COLUMNS if c in header), None)
    if image_col is None:
        raise ValueError(f"{path}: no image column; expected one of {list(IMAGE_COLUMNS)}")
    images = [r[image_col].strip() for r in rows]
    if len(set(images)) != len(images):
        raise ValueError(f"{path}: an image is listed twice")
    if NIH_FINDINGS in header:
        names = list(findings)
        truth = np.zeros((len(rows), len(names)), dtype=np.int8)
        for i, r in enumerate(rows):
            listed = {s.strip() for s in r[NIH_FINDINGS].split("|") if s.strip()}
            if NO_FINDING in listed and len(listed) > 1:
                raise ValueError(f"{path}: row {i + 2} says '{NO_FINDING}' and also lists findings")
            unknown = listed - {NO_FINDING} - set(names)
            if unknown and ABNORMAL not in names:  # `abnormal` counts any finding; otherwise a name is a label
                raise ValueError(f"{path}: row {i + 2} lists {sorted(unknown)}, not labels of the model {list(names)}")
            for j, name in enumerate(names):
                truth[i, j] = bool(listed - {NO_FINDING}) if name == ABNORMAL else name in listed
        if not truth.any():
            raise ValueError(f"{path}: no row lists any of the model's labels {list(names)}")
        return LabelTable(images, names, truth, "nih")
    derived = ABNORMAL not in header and NO_FINDING_COLUMN in header  # abnormal = not no_finding
    names = [name for name in findings if name in header or (name == ABNORMAL and derived)]
    if not names:
        raise ValueError(f"{path}: none of the model's labels {list(findings)} is a column, and no '{NIH_FINDINGS}'")
    truth = np.zeros((len(rows), len(names)), dtype=np.int8)
    for i, r in enumerate(rows):
        for j, name in enumerate(names):
            column = NO_FINDING_COLUMN if name == ABNORMAL and derived else name
            value = r[column].strip()
            if value not in ("0", "1"):
                raise ValueError(f"{path}: row {i + 2} column {column!r} is {value!r}, not 0 or 1")
            truth[i, j] = (value == "1") != (column != name)
    return LabelTable(images, names, truth, "columns")


def dataset_hash(label_file: Path, image_paths: Sequence[Path]) -> str:
    """SHA-256 of the label file's bytes, then of each image's name and bytes in label order: the
    same labels and pixels give the same hash wherever the folder lives."""
    h = hashlib.sha256()
    h.update(label_file.read_bytes())
    for p in image_paths:
        h.update(p.name.encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


# -- metrics ------------------------------------------------------------------------------------


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic (ties count one half); both classes needed."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs positives and negatives")
    _, inverse, counts = np.unique(np.asarray(score, dtype=np.float64), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    rank_of = (ends - (counts - 1) / 2.0)[inverse]  # 1-based ranks, averaged over runs of ties
    return float((rank_of[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def bootstrap_auroc_ci(
    y: np.ndarray, score: np.ndarray, *, n: int = DEFAULT_BOOTSTRAP, random_seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile CI of AUROC over `n` stratified resamples (positives and negatives resampled
    separately, so every resample has both classes), from a seeded generator: reproducible."""
    if n < 1:
        raise ValueError("bootstrap n must be >= 1")
    y = np.asarray(y).astype(bool)
    pos, neg = np.asarray(score)[y], np.asarray(score)[~y]
    rng = np.random.default_rng(random_seed)
    labels = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
    stats = np.empty(n)
    for b in range(n):
        sample = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        stats[b] = auroc(labels, sample)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1.0 - alpha))


def sensitivity_specificity(y: np.ndarray, called: np.ndarray) -> tuple[float | None, float | None]:
    """Sensitivity (None without positives) and specificity (None without negatives) of the calls."""
    y, called = np.asarray(y).astype(bool), np.asarray(called).astype(bool)
    sens = float((called & y).sum() / y.sum()) if y.any() else None
    spec = float((~called & ~y).sum() / (~y).sum()) if (~y).any() else None
    return sens, spec


@dataclass(frozen=True)
class Reliability:
    """Equal-width bins over [0, 1]: per bin the count, mean probability and observed positive rate."""

    edges: list[float]
    counts: list[int]
    mean_probability: list[float | None]
    observed_rate: list[float | None]
    ece: float


def reliability(y: np.ndarray, prob: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """ECE = sum over bins of (bin count / N) x |observed rate - mean probability|, with `bins`
    equal-width bins, [k/bins, (k+1)/bins) and the last one closed at 1."""
    y, prob = np.asarray(y, dtype=np.float64), np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0)
    index = np.minimum((prob * bins).astype(int), bins - 1)
    counts: list[int] = []
    means: list[float | None] = []
    rates: list[float | None] = []
    ece = 0.0
    for k in range(bins):
        inside = index == k
        c = int(inside.sum())
        counts.append(c)
        if c == 0:
            means.append(None)
            rates.append(None)
            continue
        m, r = float(prob[inside].mean()), float(y[inside].mean())
        means.append(m)
        rates.append(r)
        ece += c / len(y) * abs(r - m)
    return Reliability([k / bins for k in range(bins + 1)], counts, means, rates, float(ece))


# -- threshold choice ---------------------------------------------------------------------------


def parse_rule(rule: str) -> tuple[str, float | None]:
    """`sensitivity=0.9` -> ("sensitivity", 0.9); `youden` -> ("youden", None); ValueError otherwise."""
    text = rule.strip().lower()
    if text == "youden":
        return "youden", None
    key, sep, value = text.partition("=")
    if key.strip() == "sensitivity" and sep:
        target = float(value)
        if not 0.0 < target <= 1.0:
            raise ValueError(f"--choose-thresholds sensitivity must be within (0, 1], not {target}")
        return "sensitivity", target
    raise ValueError(f"--choose-thresholds: {rule!r} is neither 'sensitivity=<0..1>' nor 'youden'")


def _youden_cut(y: np.ndarray, prob: np.ndarray) -> float:
    """The score maximising sensitivity + specificity - 1 (the highest on ties within 1e-12), by one
    scan of the distinct scores from the top: O(n log n) for the sort, not a pass over the data per score."""
    values, inverse = np.unique(prob, return_inverse=True)
    pos_at = np.bincount(inverse[y], minlength=len(values))[::-1]  # per distinct score, highest first
    neg_at = np.bincount(inverse[~y], minlength=len(values))[::-1]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    youden = np.cumsum(pos_at) / n_pos + (n_neg - np.cumsum(neg_at)) / n_neg - 1.0
    best, cut = -2.0, 1.0
    for value, j in zip(values[::-1].tolist(), youden.tolist(), strict=True):
        if j > best + 1e-12:
            best, cut = j, value
    return float(cut)


def choose_threshold(y: np.ndarray, prob: np.ndarray, rule: str, target: float | None) -> float:
    """The threshold (probability >= threshold is positive) for `rule`, from both classes of the data.

    sensitivity: the highest cut whose sensitivity is >= target (at the ceil(target x positives)-th
    highest positive score). youden: the cut maximising sensitivity + specificity - 1 (the highest on
    ties). The threshold is placed halfway between that score and the next lower score in the data, so
    it makes the same calls here while a last-digit difference in a served probability (another batch
    size) does not flip the case on the cut. Never 0 (the service refuses it).
    """
    y = np.asarray(y).astype(bool)
    prob = np.asarray(prob, dtype=np.float32)
    if rule == "sensitivity":
        assert target is not None
        pos = np.sort(prob[y])[::-1]
        k = max(1, math.ceil(target * len(pos) - 1e-9))
        cut = float(pos[k - 1])
    else:
        cut = _youden_cut(y, prob)
    below = prob[prob < np.float32(cut)]
    t = np.float32((cut + float(below.max())) / 2.0) if len(below) else np.float32(cut / 2.0)
    if len(below) and t <= below.max():  # adjacent float32 values: the halfway rounds onto the lower score
        t = np.float32(cut)
    return max(float(t), float(np.finfo(np.float32).tiny))


# -- the run ------------------------------------------------------------------------------------


@dataclass
class ModelRun:
    """Per-image service outputs of one model, in label-table order."""

    info: dict[str, Any]
    probabilities: np.ndarray  # images x labels (float32)
    thresholds: np.ndarray  # images x labels; NaN where the service applies none
    positive: np.ndarray  # images x labels (bool), the service's own calls
    labels: list[str]


async def _model_info(client: AsyncCxrClient, model: str) -> Any:
    """The ListModels entry of `model` (its serving version), or of `name@version` (a loaded version)."""
    name, _, version = model.partition("@")
    found = [m for m in await client.list_models("classification") if m.name == name]
    if version:
        found = [m for m in found if m.version == version]
    else:  # several versions loaded: the one that serves, not the first listed
        found.sort(key=lambda m: m.role not in ("", "serving"))
    if found:
        return found[0]
    raise ValueError(f"model {model!r} is not served by the classification service")


async def run_model(
    client: AsyncCxrClient, model: str, paths: Sequence[Path], *, concurrency: int, progress: bool
) -> ModelRun:
    """Classify every image with `model` through the service; raises the first image's error, and
    ValueError when the model's version or a label's threshold changed during the run (a reload mid-evaluation)."""
    summary = await batch_process_images(
        client, paths, operation="classify", concurrency=concurrency, progress=progress, model_names=[model]
    )
    if summary.failed:
        first = summary.failed[0]
        raise ValueError(f"{len(summary.failed)} images failed to classify; first: {first.path}: {first.error}")
    name = model.partition("@")[0]  # `name@version` evaluates a loaded version that need not serve
    preds = [next(p for p in r.response.predictions if p.model.name == name) for r in summary.results]
    versions = {p.model.version for p in preds}
    if len(versions) != 1:
        raise ValueError(f"model {model!r} changed version during the evaluation: {sorted(versions)}")
    labels = [f.label for f in preds[0].findings]
    prob = np.array([[f.probability for f in p.findings] for p in preds], dtype=np.float32)
    thr = np.array([[f.threshold for f in p.findings] for p in preds], dtype=np.float32)
    pos = np.array([[f.positive for f in p.findings] for p in preds], dtype=bool)
    for j, label in enumerate(labels):  # a threshold reload without a version change: the calls would mix
        served = sorted({"none" if math.isnan(t) else repr(float(t)) for t in thr[:, j]})
        if len(served) > 1:
            raise ValueError(f"model {model!r} changed the threshold of {label!r} during the evaluation: {served}")
    m = preds[0].model
    info = {"name": m.name, "version": m.version, "untrained": bool(m.untrained), "architecture": m.architecture}
    return ModelRun(info, prob, thr, pos, labels)


def _image_paths(images: Path, table: LabelTable) -> list[Path]:
    """The labelled images' paths; a name that resolves outside `images` (absolute, `..`, a link out) is refused."""
    root = images.resolve()
    outside = [name for name in table.images if not (images / name).resolve().is_relative_to(root)]
    if outside:
        raise ValueError(f"{len(outside)} labelled image names point outside {images}, e.g. {outside[:3]}")
    paths = [images / name for name in table.images]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"{len(missing)} labelled images are not in {images}, e.g. {missing[:3]}")
    return paths


def finding_metrics(
    label: str, y: np.ndarray, run: ModelRun, j: int, *, bootstrap: int, random_seed: int, bins: int
) -> dict[str, Any]:
    """One finding's metrics; metrics that need a class the data lack are None with `not_estimable`."""
    prob = run.probabilities[:, j]
    thresholds = {float(t) for t in run.thresholds[:, j] if not math.isnan(t)}
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    out: dict[str, Any] = {"finding": label, "images": len(y), "positives": n_pos, "negatives": n_neg}
    out["threshold"] = thresholds.pop() if len(thresholds) == 1 else None
    reasons = []
    if n_pos == 0:
        reasons.append("no positive cases in the data")
    if n_neg == 0:
        reasons.append("no negative cases in the data")
    out["not_estimable"] = "; ".join(reasons) or None
    if reasons:
        out["auroc"] = out["auroc_ci95"] = None
    else:
        out["auroc"] = auroc(y, prob)
        out["auroc_ci95"] = list(bootstrap_auroc_ci(y, prob, n=bootstrap, random_seed=random_seed))
    sens, spec = sensitivity_specificity(y, run.positive[:, j])
    out["sensitivity"], out["specificity"] = sens, spec
    if out["threshold"] is None and not run.positive[:, j].any():
        out["threshold_note"] = "the service applies no threshold to this label (never positive)"
    rel = reliability(y, prob, bins)
    out["ece"] = rel.ece
    out["reliability"] = {
        "edges": rel.edges,
        "counts": rel.counts,
        "mean_probability": rel.mean_probability,
        "observed_rate": rel.observed_rate,
    }
    return out


async def evaluate(
    client: AsyncCxrClient,
    labels_csv: Path,
    images: Path,
    *,
    model: str = "multiclass_classifier",
    concurrency: int = 4,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    random_seed: int = 0,
    bins: int = ECE_BINS,
    choose: str | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Evaluate `model` through the service on the labelled folder; the report as a JSON-ready dict
    (`write_evaluation` writes it as JSON, Markdown, HTML and a thresholds file; `record_on_card` records it
    on the model card, after the files are written so a refused recording loses nothing)."""
    if bins < 1:  # every setting checked before the first RPC, not after every image is classified
        raise ValueError("bins must be >= 1")
    if bootstrap < 1:
        raise ValueError("bootstrap must be >= 1")
    if random_seed < 0:
        raise ValueError("seed must be >= 0 (a seed of numpy's random generator)")
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    rule = parse_rule(choose) if choose else None
    info = await _model_info(client, model)
    table = read_labels(labels_csv, list(info.labels))
    paths = _image_paths(images, table)
    digest = dataset_hash(labels_csv, paths)
    # every request pins the version chosen now: a canary or a promote during the run does not mix versions
    pinned = model if "@" in model else f"{info.name}@{info.version}"
    run = await run_model(
        client, pinned, paths, concurrency=concurrency, progress=sys.stderr.isatty() if progress is None else progress
    )
    findings = []
    for k, label in enumerate(table.findings):
        j = run.labels.index(label)
        findings.append(
            finding_metrics(label, table.truth[:, k], run, j, bootstrap=bootstrap, random_seed=random_seed, bins=bins)
        )
    report: dict[str, Any] = {
        "kind": "cxr.evaluation.v1",
        "task": "classification",
        "status": REPORT_STATUS,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": run.info,
        "dataset": {
            "labels": str(labels_csv),
            "images_folder": str(images),
            "label_format": table.source_format,
            "images": len(paths),
            "sha256": digest,
        },
        "settings": {
            "bootstrap": bootstrap,
            "random_seed": random_seed,
            "ece_bins": bins,
            "ci": "stratified bootstrap, percentile",
        },
        "findings": findings,
        "not_evaluated": [label for label in run.labels if label not in table.findings],
        "notes": [UNTRAINED_NOTE] if run.info["untrained"] else [],
    }
    estimable = [f["auroc"] for f in findings if f["auroc"] is not None]
    report["macro_auroc"] = float(np.mean(estimable)) if estimable else None
    if rule is not None:
        report["chosen_thresholds"] = chosen(table, run, rule)
        report["notes"].append(NOT_HELD_OUT)
    return report


async def record_on_card(client: AsyncCxrClient, report: dict[str, Any]) -> dict[str, Any]:
    """Record the report on the card of the version it evaluated (an admin call the server refuses when
    another version serves by then); what `report["model_card"]` keeps of the card."""
    name, version = report["model"]["name"], report["model"]["version"]
    loaded = [m for m in await client.list_models("classification") if m.name == name and m.version == version]
    if loaded and loaded[0].role not in ("", "serving"):  # a candidate loaded beside the serving version
        name = f"{name}@{version}"
    card = await client.record_model_evaluation("classification", name, card_evaluation(report))
    return {"recorded": True, "source": card.source, "digest": card.digest}


def card_evaluation(report: dict[str, Any]) -> Any:
    """The report's summary as the ModelEvaluation a model card keeps: per-finding AUROC with its CI and the
    sensitivity/specificity at the threshold used, the dataset's hash and size, the date (NaN: not estimable)."""
    from cxr_protos.common.v1 import common_pb2

    def num(value: float | None) -> float:
        return math.nan if value is None else float(value)

    findings = [
        common_pb2.FindingPerformance(
            finding=f["finding"],
            auroc=num(f["auroc"]),
            auroc_ci_low=num(f["auroc_ci95"][0] if f["auroc_ci95"] else None),
            auroc_ci_high=num(f["auroc_ci95"][1] if f["auroc_ci95"] else None),
            threshold=num(f["threshold"]),
            sensitivity=num(f["sensitivity"]),
            specificity=num(f["specificity"]),
            positives=f["positives"],
            negatives=f["negatives"],
        )
        for f in report["findings"]
    ]
    return common_pb2.ModelEvaluation(
        model_version=report["model"]["version"],
        dataset_sha256=report["dataset"]["sha256"],
        dataset_images=report["dataset"]["images"],
        evaluated_at=report["generated_at"],
        findings=findings,
        macro_auroc=num(report["macro_auroc"]),
        notes=report["notes"],
    )


def chosen(table: LabelTable, run: ModelRun, rule: tuple[str, float | None]) -> dict[str, Any]:
    """Thresholds per estimable finding for `rule`, with the sensitivity/specificity they give on this data."""
    name, target = rule
    out: dict[str, Any] = {
        "rule": name if target is None else f"{name}={target}",
        "measured_on": "the data that chose them (not held out)",
        "thresholds": {},
        "skipped": {},
        "notes": {},
    }
    for k, label in enumerate(table.findings):
        y = table.truth[:, k]
        if y.all() or not y.any():
            out["skipped"][label] = "needs positives and negatives"
            continue
        prob = run.probabilities[:, run.labels.index(label)]
        t = choose_threshold(y, prob, name, target)
        sens, spec = sensitivity_specificity(y, prob >= np.float32(t))
        out["thresholds"][label] = {"threshold": t, "sensitivity": sens, "specificity": spec}
        if target is not None:
            reached = sens is not None and sens >= target - 1e-9
            out["thresholds"][label]["target_reached"] = reached
            if not reached:  # only positives scoring 0 do this: the threshold must be above 0
                at_zero = int((prob[y.astype(bool)] <= 0).sum())
                out["notes"][label] = (
                    f"{label}: sensitivity {sens:.3f} misses the target {target}: {at_zero} positive(s) score "
                    "exactly 0 and a threshold must be above 0"
                )
    return out


def threshold_file(report: dict[str, Any]) -> dict[str, Any]:
    """The versioned thresholds file `cxr models load --thresholds` applies: the thresholds, the model
    version they were chosen for (LoadModel refuses another) and the data they were chosen on."""
    chosen_ = report["chosen_thresholds"]
    return {
        "kind": THRESHOLDS_SCHEMA,
        "model": report["model"]["name"],
        "model_version": report["model"]["version"],
        "untrained": report["model"]["untrained"],
        "rule": chosen_["rule"],
        "dataset": {"sha256": report["dataset"]["sha256"], "images": report["dataset"]["images"]},
        "measured_on": chosen_["measured_on"],
        "generated_at": report["generated_at"],
        "thresholds": {label: v["threshold"] for label, v in chosen_["thresholds"].items()},
        **(
            {"target_reached": {label: v["target_reached"] for label, v in chosen_["thresholds"].items()}}
            if chosen_["rule"].startswith("sensitivity")
            else {}
        ),
        "notes": list(chosen_.get("notes", {}).values()),
    }


def read_threshold_file(path: Path, model: str) -> tuple[dict[str, float], str]:
    """(thresholds by label, model version) of a file `threshold_file` wrote for `model`; ValueError if it is
    not one, or was written for another model (two models may share label names and a version such as
    `untrained`, so the service's version check alone would not catch it)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("kind") != THRESHOLDS_SCHEMA:
        raise ValueError(f"{path}: not a thresholds file (kind {THRESHOLDS_SCHEMA!r})")
    if data.get("model") != model:
        raise ValueError(
            f"{path}: these thresholds were chosen for model {data.get('model')!r}, not {model!r}; "
            f"load them into {data.get('model')!r}"
        )
    values = {str(k): float(v) for k, v in data["thresholds"].items()}
    return values, str(data["model_version"])
