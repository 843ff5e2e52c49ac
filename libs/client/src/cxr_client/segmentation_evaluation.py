"""`cxr evaluate --task segmentation`: how a segmentation model, served, matches reference masks.

The images go through the public SegmentImage RPC (bounded concurrency, `batch_process_images`), so the
masks scored are the ones the service returns: at the image's own size, after its preprocessing,
weights and threshold. References are read from `<masks>/<image-stem>/<class>.png`; per class the
report gives Dice and HD95 (segmentation_metrics.py) over the images that have a reference for it,
with bootstrap confidence intervals of the means. Layout, definitions and edge cases: docs/evaluate.md.
"""

from __future__ import annotations

import hashlib
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cxr_client.batch import batch_process_images
from cxr_client.client import AsyncCxrClient
from cxr_client.evaluation import DEFAULT_BOOTSTRAP, REPORT_STATUS
from cxr_client.images import IMAGE_SUFFIXES
from cxr_client.segmentation_metrics import bootstrap_mean_ci, dice, hd95

MASK_LAYOUT = "<masks>/<image-stem>/<class>.png"
MASK_SUFFIX = ".png"
SINGLE_CHANNEL = ("1", "L", "I", "I;16", "I;16B", "I;16L")  # Pillow modes of a one-channel PNG
UNTRAINED_NOTE = (
    "This model is UNTRAINED (random weights): its masks are meaningless, and these numbers describe an "
    "untrained model, not any trained checkpoint."
)
HD95_BOTH_EMPTY = "both masks empty: no boundary to measure"
HD95_ONE_EMPTY = "one mask empty: the distance is infinite"


@dataclass(frozen=True)
class References:
    """The reference masks found: per image (sorted by stem) its path and its mask file per class."""

    stems: list[str]
    images: list[Path]
    files: list[dict[str, Path]]  # per image: class -> mask file
    classes: list[str]  # model classes with at least one reference, in model order


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _check_png(path: Path) -> tuple[int, int]:
    """(height, width) of a one-channel PNG mask; ValueError naming the file otherwise. Reads the header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.format != "PNG" or im.mode not in SINGLE_CHANNEL:
                raise ValueError(
                    f"{path}: a reference mask must be a one-channel PNG (0 outside, nonzero inside), "
                    f"not {im.format} mode {im.mode}"
                )
            return im.size[1], im.size[0]
    except UnidentifiedImageError as exc:
        raise ValueError(f"{path}: not an image: {exc}") from None


def read_mask(path: Path) -> np.ndarray:
    """A reference mask: True where the pixel is nonzero."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im) > 0


def _image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) of a PNG/JPEG from its header; None for what Pillow cannot read (DICOM: the
    service's answer gives the size)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (UnidentifiedImageError, OSError):
        return None


def read_references(masks: Path, images: Path, classes: Sequence[str]) -> References:
    """The reference masks under `masks` (MASK_LAYOUT) and the images they belong to; ValueError naming
    the file for anything off the layout: a loose file, a non-PNG or multi-channel mask, a class the
    model does not have, an image missing or found twice, masks of one image in different sizes, or a
    mask or image that resolves outside its folder. A class without a file for an image is not
    annotated there and is left out of that image's scores (an absent structure is an all-zero mask)."""
    if not masks.is_dir():
        raise ValueError(f"{masks}: reference masks must be a folder ({MASK_LAYOUT})")
    by_stem: dict[str, list[Path]] = {}
    for p in _visible(images):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            by_stem.setdefault(p.stem, []).append(p)
    known = list(classes)
    stems, paths, files = [], [], []
    for folder in _visible(masks):
        if not folder.is_dir():
            raise ValueError(f"{folder}: a loose file; reference masks go in {MASK_LAYOUT}")
        found = by_stem.get(folder.name, [])
        if not found:
            raise ValueError(f"{folder}: no image named {folder.name}.* ({', '.join(IMAGE_SUFFIXES)}) in {images}")
        if len(found) > 1:
            raise ValueError(f"{folder}: more than one image is named {folder.name}: {[p.name for p in found]}")
        image = found[0]
        if not _inside(image, images) or not _inside(folder, masks):
            raise ValueError(f"{folder.name}: the image or its mask folder resolves outside {images} or {masks}")
        per_class: dict[str, Path] = {}
        sizes = set()
        for f in _visible(folder):
            if f.suffix.lower() != MASK_SUFFIX or not f.is_file():
                raise ValueError(f"{f}: not a PNG; reference masks are {MASK_LAYOUT}")
            if f.stem not in known:
                raise ValueError(f"{f}: {f.stem!r} is not a class of the model; its classes are {known}")
            if not _inside(f, masks):
                raise ValueError(f"{f}: resolves outside {masks}")
            sizes.add(_check_png(f))
            per_class[f.stem] = f
        if not per_class:
            raise ValueError(f"{folder}: no {MASK_SUFFIX} mask in it; an absent structure is an all-zero mask")
        if len(sizes) > 1:
            raise ValueError(f"{folder}: its masks differ in size (height, width): {sorted(sizes)}")
        size = _image_size(image)
        if size is not None and size not in sizes:
            raise ValueError(
                f"{folder}: masks of {sizes.pop()} (height, width), but the image {image.name} is {size}; "
                "references must be at the image's own size"
            )
        stems.append(folder.name)
        paths.append(image)
        files.append(per_class)
    if not stems:
        raise ValueError(f"{masks}: no reference masks ({MASK_LAYOUT})")
    present = {c for f in files for c in f}
    return References(stems, paths, files, [c for c in known if c in present])


def dataset_hash(refs: References) -> str:
    """SHA-256 over, per image in stem order, its name, a NUL and the SHA-256 of its bytes, then per
    class file sorted by class name `<stem>/<class>.png`, a NUL and the SHA-256 of its bytes."""
    h = hashlib.sha256()
    for image, per_class in zip(refs.images, refs.files, strict=True):
        h.update(image.name.encode() + b"\0" + hashlib.sha256(image.read_bytes()).digest())
        for c in sorted(per_class):
            name = f"{image.stem}/{c}{MASK_SUFFIX}"
            h.update(name.encode() + b"\0" + hashlib.sha256(per_class[c].read_bytes()).digest())
    return h.hexdigest()


async def _model_info(client: AsyncCxrClient, model: str | None) -> tuple[Any, str]:
    """The ModelInfo of the version to evaluate and the model name every request sends: `name@version`
    pins that version (a candidate loaded beside the serving one), a plain name or no name (the only model)
    is the version that serves."""
    models = list(await client.list_models("segmentation"))
    name, _, version = (model or "").partition("@")
    names = sorted({m.name for m in models})
    if not name:
        if len(names) != 1:
            raise ValueError(f"the segmentation service serves {names}: name one with --model")
        name = names[0]
    versions = [m for m in models if m.name == name]
    if not versions:
        raise ValueError(f"model {name!r} is not served by the segmentation service; it serves {names}")
    if version:
        pinned = [m for m in versions if m.version == version]
        if not pinned:
            loaded = [m.version for m in versions]
            raise ValueError(f"model {name!r} has no version {version!r} loaded; loaded: {loaded}")
        return pinned[0], f"{name}@{version}"
    serving = [m for m in versions if m.role in ("", "serving")]
    if len(serving) != 1:
        raise ValueError(f"model {name!r}: no single serving version among {[m.version for m in versions]}")
    info = serving[0]  # pinned too, so no canary share of the requests goes to another version
    return info, f"{name}@{info.version}" if info.version else name


def _predicted(response: Any) -> dict[str, np.ndarray]:
    from PIL import Image

    return {m.label: np.asarray(Image.open(io.BytesIO(m.png))) > 127 for m in response.masks}


def score_image(stem: str, files: dict[str, Path], predicted: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Dice and HD95 of each annotated class of one image; ValueError when a reference's size is not the image's."""
    rows = []
    for c, path in files.items():
        ref, pred = read_mask(path), predicted[c]
        if ref.shape != pred.shape:
            raise ValueError(
                f"{path}: the reference is {ref.shape} (height, width) but the image is {pred.shape}; "
                "references must be at the image's own size"
            )
        d, h = dice(ref, pred), hd95(ref, pred)
        row: dict[str, Any] = {"image": stem, "class": c, "dice": d, "hd95": h}
        row["reference_pixels"], row["predicted_pixels"] = int(ref.sum()), int(pred.sum())
        if h is None:
            both = row["reference_pixels"] == 0 and row["predicted_pixels"] == 0
            row["hd95_not_estimable"] = HD95_BOTH_EMPTY if both else HD95_ONE_EMPTY
        rows.append(row)
    return rows


def _ci(values: list[float], bootstrap: int, random_seed: int) -> list[float] | None:
    ci = bootstrap_mean_ci(np.asarray(values), n=bootstrap, random_seed=random_seed)
    return None if ci is None else list(ci)


def class_summary(c: str, rows: list[dict[str, Any]], *, bootstrap: int, random_seed: int) -> dict[str, Any]:
    """One class over the images annotated for it: mean, median and bootstrap CI of Dice and of HD95 (the
    latter over the images where both masks are non-empty), and how often a mask was empty."""
    dices = [r["dice"] for r in rows]
    hds = [r["hd95"] for r in rows if r["hd95"] is not None]
    ref_empty = [r["reference_pixels"] == 0 for r in rows]
    pred_empty = [r["predicted_pixels"] == 0 for r in rows]
    out: dict[str, Any] = {
        "class": c,
        "images": len(rows),
        "dice_mean": float(np.mean(dices)),
        "dice_median": float(np.median(dices)),
        "dice_ci95": _ci(dices, bootstrap, random_seed),
        "hd95_images": len(hds),
        "hd95_mean": float(np.mean(hds)) if hds else None,
        "hd95_median": float(np.median(hds)) if hds else None,
        "hd95_ci95": _ci(hds, bootstrap, random_seed),
        "both_empty": sum(r and p for r, p in zip(ref_empty, pred_empty, strict=True)),
        "missed": sum(p and not r for r, p in zip(ref_empty, pred_empty, strict=True)),  # reference has it, model not
        "spurious": sum(r and not p for r, p in zip(ref_empty, pred_empty, strict=True)),  # model has it, reference not
    }
    out["hd95_not_estimable"] = None if hds else "no image where both the reference and the prediction are non-empty"
    return out


async def evaluate_segmentation(
    client: AsyncCxrClient,
    masks: Path,
    images: Path,
    *,
    model: str | None = None,
    threshold: float = 0.0,
    concurrency: int = 4,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    random_seed: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Evaluate the segmentation `model` (None: the only one served) through the service against the
    reference masks; the report as a JSON-ready dict (`write_evaluation` writes it). `threshold` 0 is
    the model's configured one."""
    if bootstrap < 1:
        raise ValueError("bootstrap must be >= 1")
    if random_seed < 0:
        raise ValueError("seed must be >= 0 (a seed of numpy's random generator)")
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be within (0, 1), or 0 for the model's configured one, not {threshold}")
    info, pinned = await _model_info(client, model)
    refs = read_references(masks, images, list(info.labels))
    digest = dataset_hash(refs)
    show = sys.stderr.isatty() if progress is None else progress
    summary = await batch_process_images(
        client,
        refs.images,
        operation="segment",
        concurrency=concurrency,
        progress=show,
        model_name=pinned,
        classes=refs.classes,
        mask_encoding="png",
        threshold=threshold,
    )
    if summary.failed:
        first = summary.failed[0]
        raise ValueError(f"{len(summary.failed)} images failed to segment; first: {first.path}: {first.error}")
    versions = {r.response.model.version for r in summary.results}
    if len(versions) != 1 or (info.version and versions != {info.version}):
        raise ValueError(f"model {info.name!r}: version {info.version!r} asked, {sorted(versions)} answered")
    per_image: list[dict[str, Any]] = []
    bar = tqdm(total=len(refs.stems), desc="score", unit="img", disable=not show, leave=False)
    try:
        for stem, files, result in zip(refs.stems, refs.files, summary.results, strict=True):
            per_image += score_image(stem, files, _predicted(result.response))
            bar.update(1)
    finally:
        bar.close()
    m = summary.results[0].response.model
    classes = [
        class_summary(c, [r for r in per_image if r["class"] == c], bootstrap=bootstrap, random_seed=random_seed)
        for c in refs.classes
    ]
    untrained = bool(m.untrained)
    return {
        "kind": "cxr.evaluation.v1",
        "task": "segmentation",
        "status": REPORT_STATUS,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {"name": m.name, "version": m.version, "untrained": untrained, "architecture": m.architecture},
        "dataset": {
            "masks": str(masks),
            "images_folder": str(images),
            "layout": MASK_LAYOUT,
            "images": len(refs.stems),
            "sha256": digest,
        },
        "settings": {
            "bootstrap": bootstrap,
            "random_seed": random_seed,
            "ci": "bootstrap over images, percentile, of the mean",
            "threshold": threshold or "the model's configured threshold",
            "units": "pixels of the image",
            "hd95": "max of the two directed 95th percentiles of boundary distances (4-connected boundary)",
        },
        "classes": classes,
        "macro_dice": float(np.mean([c["dice_mean"] for c in classes])),
        "not_evaluated": [c for c in info.labels if c not in refs.classes],
        "per_image": per_image,
        "notes": [UNTRAINED_NOTE] if untrained else [],
    }


async def record_segmentation_on_card(client: AsyncCxrClient, report: dict[str, Any]) -> dict[str, Any]:
    """Record the report on the card of the version it evaluated, as `cxr evaluate` does for a classifier: a
    version loaded beside the serving one by `name@version` (the serving version's card stays as it is), the
    serving version by its name (refused by the server when another version serves by then); what
    `report["model_card"]` keeps of the card."""
    name, version = report["model"]["name"], report["model"]["version"]
    loaded = [m for m in await client.list_models("segmentation") if m.name == name and m.version == version]
    if loaded and loaded[0].role not in ("", "serving"):
        name = f"{name}@{version}"
    card = await client.record_model_evaluation("segmentation", name, card_evaluation(report))
    return {"recorded": True, "source": card.source, "digest": card.digest}


def card_evaluation(report: dict[str, Any]) -> Any:
    """The report's summary as the ModelEvaluation a model card keeps: per class the mean Dice and HD95 with
    their bootstrap CIs and the images counted, the dataset's hash and size, the date (NaN: not estimable)."""
    from cxr_protos.common.v1 import common_pb2

    def num(value: float | None) -> float:
        return math.nan if value is None else float(value)

    def ci(pair: list[float] | None) -> tuple[float, float]:
        return (num(pair[0]), num(pair[1])) if pair else (math.nan, math.nan)

    classes = []
    for c in report["classes"]:
        (dice_low, dice_high), (hd_low, hd_high) = ci(c["dice_ci95"]), ci(c["hd95_ci95"])
        classes.append(
            common_pb2.ClassSegmentationPerformance(
                class_name=c["class"],
                images=c["images"],
                dice_mean=num(c["dice_mean"]),
                dice_ci_low=dice_low,
                dice_ci_high=dice_high,
                hd95_images=c["hd95_images"],
                hd95_mean=num(c["hd95_mean"]),
                hd95_ci_low=hd_low,
                hd95_ci_high=hd_high,
            )
        )
    return common_pb2.ModelEvaluation(
        model_version=report["model"]["version"],
        dataset_sha256=report["dataset"]["sha256"],
        dataset_images=report["dataset"]["images"],
        evaluated_at=report["generated_at"],
        classes=classes,
        macro_dice=num(report["macro_dice"]),
        macro_auroc=math.nan,
        notes=report["notes"],
    )
