"""The reference-mask layout of `cxr evaluate --task segmentation` (what is read, what is refused and
why), per-image scores and the per-class summary, and the CLI's choice of task and its refused options,
on files written here (the service runs in tests/integration/test_evaluate_segmentation.py)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_client.cli import build_parser, cmd_evaluate, evaluation_task
from cxr_client.segmentation_evaluation import (
    HD95_BOTH_EMPTY,
    HD95_ONE_EMPTY,
    class_summary,
    dataset_hash,
    read_references,
    score_image,
)

CLASSES = ["left_lung", "right_lung", "heart"]


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def _folders(tmp_path: Path, size: tuple[int, int] = (32, 48)) -> tuple[Path, Path]:
    """images/a.png, images/b.png (h x w) and masks/a/{left_lung,heart}.png, masks/b/heart.png."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    for stem in ("a", "b"):
        _png(images / f"{stem}.png", np.zeros(size, np.uint8))
    m = np.zeros(size, np.uint8)
    m[4:10, 4:12] = 255
    _png(masks / "a" / "left_lung.png", m)
    _png(masks / "a" / "heart.png", m)
    _png(masks / "b" / "heart.png", (m > 0).astype(np.uint8))  # 0/1 is as good as 0/255
    return masks, images


def test_layout_is_read_and_unannotated_classes_are_left_out(tmp_path: Path) -> None:
    masks, images = _folders(tmp_path)
    (images / "c.png").write_bytes((images / "a.png").read_bytes())  # an image without references: not evaluated
    refs = read_references(masks, images, CLASSES)
    assert refs.stems == ["a", "b"] and refs.images == [images / "a.png", images / "b.png"]
    assert refs.classes == ["left_lung", "heart"]  # model order; right_lung has no reference anywhere
    assert [sorted(f) for f in refs.files] == [["heart", "left_lung"], ["heart"]]
    digest = dataset_hash(refs)
    h = hashlib.sha256()
    for stem, classes in (("a", ["heart", "left_lung"]), ("b", ["heart"])):  # per image, classes sorted by name
        h.update(f"{stem}.png".encode() + b"\0" + hashlib.sha256((images / f"{stem}.png").read_bytes()).digest())
        for c in classes:
            h.update(
                f"{stem}/{c}.png".encode() + b"\0" + hashlib.sha256((masks / stem / f"{c}.png").read_bytes()).digest()
            )
    assert digest == h.hexdigest()
    _png(masks / "b" / "heart.png", np.zeros((32, 48), np.uint8))  # a reference changed: another dataset
    assert dataset_hash(read_references(masks, images, CLASSES)) != digest


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("loose", "a loose file"),
        ("unknown_class", "'spleen' is not a class of the model"),
        ("rgb", "one-channel PNG"),
        ("jpeg", "not a PNG"),
        ("no_image", "no image named zz"),
        ("two_images", "more than one image is named a"),
        ("mask_size", "references must be at the image's own size"),
        ("sizes_differ", "differ in size"),
        ("empty_folder", "no .png mask"),
        ("link_out", "resolves outside"),
        ("nothing", "no reference masks"),
    ],
)
def test_off_layout_references_are_refused_naming_the_file(tmp_path: Path, damage: str, message: str) -> None:
    masks, images = _folders(tmp_path)
    if damage == "loose":
        _png(masks / "a_heart.png", np.zeros((32, 48), np.uint8))
    elif damage == "unknown_class":
        _png(masks / "a" / "spleen.png", np.zeros((32, 48), np.uint8))
    elif damage == "rgb":
        _png(masks / "a" / "heart.png", np.zeros((32, 48, 3), np.uint8))
    elif damage == "jpeg":
        Image.fromarray(np.zeros((32, 48), np.uint8)).save(masks / "a" / "heart.jpg")
    elif damage == "no_image":
        _png(masks / "zz" / "heart.png", np.zeros((32, 48), np.uint8))
    elif damage == "two_images":
        (images / "a.jpg").write_bytes(b"\xff\xd8\xff")
    elif damage == "mask_size":
        _png(masks / "b" / "heart.png", np.zeros((16, 24), np.uint8))
    elif damage == "sizes_differ":
        _png(masks / "a" / "heart.png", np.zeros((33, 48), np.uint8))
    elif damage == "empty_folder":
        (masks / "c").mkdir()
        (images / "c.png").write_bytes((images / "a.png").read_bytes())
    elif damage == "link_out":
        outside = _png(tmp_path / "elsewhere" / "heart.png", np.zeros((32, 48), np.uint8))
        (masks / "a" / "heart.png").unlink()
        (masks / "a" / "heart.png").symlink_to(outside)
    elif damage == "nothing":
        masks = tmp_path / "no-masks"
        masks.mkdir()
    with pytest.raises(ValueError, match=message):
        read_references(masks, images, CLASSES)


def test_scores_of_one_image(tmp_path: Path) -> None:
    ref = np.zeros((40, 40), np.uint8)
    ref[10:20, 10:20] = 255
    files = {
        "left_lung": _png(tmp_path / "left_lung.png", ref),
        "right_lung": _png(tmp_path / "right_lung.png", np.zeros((40, 40), np.uint8)),
        "heart": _png(tmp_path / "heart.png", np.zeros((40, 40), np.uint8)),
    }
    moved = np.zeros((40, 40), bool)
    moved[10:20, 13:23] = True
    predicted = {"left_lung": moved, "right_lung": np.zeros((40, 40), bool), "heart": moved}
    rows = {r["class"]: r for r in score_image("a", files, predicted)}
    assert rows["left_lung"]["dice"] == pytest.approx(2 * 70 / 200) and rows["left_lung"]["hd95"] == 3.0
    assert (rows["right_lung"]["dice"], rows["right_lung"]["hd95"]) == (1.0, None)
    assert rows["right_lung"]["hd95_not_estimable"] == HD95_BOTH_EMPTY
    assert (rows["heart"]["dice"], rows["heart"]["hd95"]) == (0.0, None)
    assert rows["heart"]["hd95_not_estimable"] == HD95_ONE_EMPTY
    assert (rows["heart"]["reference_pixels"], rows["heart"]["predicted_pixels"]) == (0, 100)
    with pytest.raises(ValueError, match="the image's own size"):
        score_image("a", files, {**predicted, "left_lung": np.zeros((40, 41), bool)})


def test_class_summary_counts_empty_masks_and_averages_hd95_where_estimable() -> None:
    def row(d: float, h: float | None, ref: int, pred: int) -> dict:
        return {"dice": d, "hd95": h, "reference_pixels": ref, "predicted_pixels": pred}

    rows = [row(0.8, 2.0, 50, 40), row(0.6, 4.0, 50, 60), row(1.0, None, 0, 0), row(0.0, None, 30, 0)]
    s = class_summary("heart", rows, bootstrap=200, random_seed=0)
    assert s["images"] == 4 and s["dice_mean"] == pytest.approx(0.6) and s["dice_median"] == pytest.approx(0.7)
    assert (s["hd95_images"], s["hd95_mean"], s["hd95_median"]) == (2, 3.0, 3.0)
    assert (s["both_empty"], s["missed"], s["spurious"]) == (1, 1, 0)
    lo, hi = s["dice_ci95"]
    assert 0.0 <= lo <= 0.6 <= hi <= 1.0 and 2.0 <= s["hd95_ci95"][0] <= s["hd95_ci95"][1] <= 4.0
    none = class_summary("heart", [row(0.0, None, 30, 0)], bootstrap=10, random_seed=0)
    assert none["hd95_mean"] is None and none["hd95_ci95"] is None and none["hd95_not_estimable"]


def _args(*argv: str):
    return build_parser().parse_args(["evaluate", *argv, "--out", "out"])


def test_the_task_follows_the_input_and_other_task_options_are_refused(tmp_path: Path) -> None:
    masks, images = _folders(tmp_path)
    labels = tmp_path / "labels.csv"
    labels.write_text("image,heart\na.png,1\n")
    assert evaluation_task(_args(str(masks), str(images))) == "segmentation"
    assert evaluation_task(_args(str(labels), str(images))) == "classification"
    for extra, message in (
        (["--bins", "5"], "--bins"),
        (["--choose-thresholds", "youden"], "--choose-thresholds"),
    ):
        with pytest.raises(ValueError, match=f"{message}: classification only"):
            evaluation_task(_args(str(masks), str(images), *extra))
    assert evaluation_task(_args(str(masks), str(images), "--record-card")) == "segmentation"  # cards keep Dice
    with pytest.raises(ValueError, match="--threshold: segmentation only"):
        evaluation_task(_args(str(labels), str(images), "--threshold", "0.4"))
    with pytest.raises(ValueError, match="needs a folder of reference masks"):
        evaluation_task(_args(str(labels), str(images), "--task", "segmentation"))
    with pytest.raises(ValueError, match="needs a label CSV"):
        evaluation_task(_args(str(masks), str(images), "--task", "classification"))


class _NoService:
    """A client that must not be called: the options are refused first."""

    async def list_models(self, service: str) -> list:
        raise AssertionError("no RPC expected")


@pytest.mark.parametrize("flag", [["--bootstrap", "0"], ["--seed", "-1"], ["--concurrency", "0"], ["--threshold", "1"]])
def test_bad_settings_are_refused_before_any_rpc(tmp_path: Path, flag: list[str]) -> None:
    masks, images = _folders(tmp_path)
    args = _args(str(masks), str(images), *flag)
    with pytest.raises(ValueError, match=flag[0].lstrip("-")):
        asyncio.run(cmd_evaluate(_NoService(), args))  # type: ignore[arg-type]
