"""`cxr evaluate` of a segmentation model through a real segmentation service (untrained U-Net, resnet18
encoder, 64 px input, one image per forward) on six NIH sample images, against reference masks made
from the service's own answers: the answers themselves (Dice 1, HD95 0), and the answers translated by
K pixels (HD95 at most K, and within a pixel of it), with one reference blanked (spurious, not estimable).

The shared data has no reference masks, so the references are derived from the service; the
translation moves each mask in a direction that loses no pixel off the image, where its boundary is
the reference's boundary moved by K exactly.
"""

from __future__ import annotations

import asyncio
import io
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cxr_client import AsyncCxrClient
from cxr_client.cli import main
from cxr_client.evaluation import REPORT_STATUS
from cxr_client.segmentation_evaluation import HD95_BOTH_EMPTY, HD95_ONE_EMPTY
from tests.support.client_stack import Stack, use_stack_env
from tests.support.paths import CXR14, cxr14_images

K = 4  # pixels of the translation
CLASSES = ["left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle"]
BLANKED = (0, "heart")  # (image index, class) whose shifted reference is replaced by an all-zero mask


@pytest.fixture(scope="module")
def stack():
    from cxr_segmentation.service import build_binding

    # one image per forward: the references are the service's answers, and the evaluation's own calls must
    # give the same masks (another batch changes the last digits of a logit, and a pixel on the cut flips)
    s = Stack({"segmentation": build_binding}, server_config__max_batch_size=1).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def served(stack) -> dict[str, dict[str, np.ndarray]]:
    """The service's masks of six images: stem -> class -> H x W bool."""

    async def run() -> dict[str, dict[str, np.ndarray]]:
        async with AsyncCxrClient(stack.config()) as c:
            out = {}
            for p in cxr14_images(6):
                r = await c.segment(p)
                out[p.stem] = {m.label: np.asarray(Image.open(io.BytesIO(m.png))) > 127 for m in r.masks}
            return out

    return asyncio.run(run())


def _write(root: Path, masks: dict[str, dict[str, np.ndarray]]) -> Path:
    for stem, by_class in masks.items():
        (root / stem).mkdir(parents=True)
        for c, m in by_class.items():
            Image.fromarray(m.astype(np.uint8) * 255).save(root / stem / f"{c}.png")
    return root


def lossless_shift(mask: np.ndarray, k: int) -> np.ndarray | None:
    """`mask` translated by k pixels right, left, down or up, the first direction that moves no pixel off
    the image; None when every direction would lose some."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    if not mask[:, w - k :].any():
        out[:, k:] = mask[:, : w - k]
    elif not mask[:, :k].any():
        out[:, : w - k] = mask[:, k:]
    elif not mask[h - k :].any():
        out[k:] = mask[: h - k]
    elif not mask[:k].any():
        out[: h - k] = mask[k:]
    else:
        return None
    return out


def _evaluate(stack: Stack, masks: Path, out: Path, *extra: str) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        use_stack_env(stack, mp)
        rc = main(["evaluate", str(masks), str(CXR14 / "images"), "--out", str(out), "--bootstrap", "200", *extra])
    assert rc == 0
    return json.loads((out / "report.json").read_text())


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_references_equal_to_the_service_answers_score_dice_1_and_hd95_0(stack, served, tmp_path) -> None:
    masks = _write(tmp_path / "masks", served)
    out = tmp_path / "eval"
    report = _evaluate(stack, masks, out)  # a folder: the task is detected as segmentation

    assert report["task"] == "segmentation" and report["status"] == REPORT_STATUS
    assert report["model"] == {
        "name": "segmentation",
        "version": "untrained",
        "untrained": True,
        "architecture": "smp:Unet/resnet18",
    }
    assert any("UNTRAINED" in n for n in report["notes"])
    assert report["dataset"]["images"] == 6 and len(report["dataset"]["sha256"]) == 64
    assert [c["class"] for c in report["classes"]] == CLASSES and report["not_evaluated"] == []
    assert len(report["per_image"]) == 6 * len(CLASSES)
    for row in report["per_image"]:
        assert row["dice"] == 1.0, row
        if row["reference_pixels"]:
            assert row["hd95"] == 0.0, row
        else:
            assert row["hd95"] is None and row["hd95_not_estimable"] == HD95_BOTH_EMPTY
        assert row["reference_pixels"] == row["predicted_pixels"] == int(served[row["image"]][row["class"]].sum())
    for c in report["classes"]:
        assert c["dice_mean"] == 1.0 and c["dice_ci95"] == [1.0, 1.0]
        assert c["missed"] == c["spurious"] == 0
        if c["hd95_images"]:
            assert c["hd95_mean"] == 0.0 and c["hd95_ci95"] == [0.0, 0.0]
    assert report["macro_dice"] == 1.0

    md = (out / "report.md").read_text()
    assert REPORT_STATUS in md and "UNTRAINED" in md and report["dataset"]["sha256"] in md
    page = (out / "report.html").read_text()
    assert REPORT_STATUS in page
    parser = _Images()
    parser.feed(page)
    assert len(parser.images) == 1 and parser.images[0].startswith("data:image/png;base64,")
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --threshold goes with every request: a higher cut than the configured 0.5 shrinks the served masks
    stricter = _evaluate(stack, masks, tmp_path / "stricter", "--threshold", "0.6")
    assert stricter["settings"]["threshold"] == 0.6
    pairs = [(r["predicted_pixels"], r["reference_pixels"]) for r in stricter["per_image"]]
    assert all(p <= ref for p, ref in pairs) and any(p < ref for p, ref in pairs)


def test_references_shifted_by_k_pixels_score_hd95_k(stack, served, tmp_path) -> None:
    shifted: dict[str, dict[str, np.ndarray]] = {}
    exact: set[tuple[str, str]] = set()  # pairs translated without loss: HD95 within [K - 1, K]
    for stem, by_class in served.items():
        shifted[stem] = {}
        for c, m in by_class.items():
            moved = lossless_shift(m, K)
            if moved is not None and m.any():
                exact.add((stem, c))
            if moved is None:  # every direction loses pixels: moved right anyway, HD95 not asserted
                moved = np.zeros_like(m)
                moved[:, K:] = m[:, :-K]
            shifted[stem][c] = moved
    blank_stem = list(served)[BLANKED[0]]
    shifted[blank_stem][BLANKED[1]] = np.zeros_like(served[blank_stem][BLANKED[1]])
    exact.discard((blank_stem, BLANKED[1]))
    assert len(exact) >= 10, "too few masks can be translated without loss to test HD95"
    masks = _write(tmp_path / "masks", shifted)
    report = _evaluate(stack, masks, tmp_path / "eval", "--task", "segmentation")

    for row in report["per_image"]:
        ref, pred = shifted[row["image"]][row["class"]], served[row["image"]][row["class"]]
        total = int(ref.sum() + pred.sum())
        assert row["dice"] == pytest.approx(2 * (ref & pred).sum() / total if total else 1.0), row
        if (row["image"], row["class"]) in exact:
            assert K - 1 <= row["hd95"] <= K, row
    blank = next(r for r in report["per_image"] if (r["image"], r["class"]) == (blank_stem, BLANKED[1]))
    assert blank["reference_pixels"] == 0 and blank["predicted_pixels"] > 0
    assert blank["dice"] == 0.0 and blank["hd95"] is None and blank["hd95_not_estimable"] == HD95_ONE_EMPTY
    heart = next(c for c in report["classes"] if c["class"] == BLANKED[1])
    assert heart["spurious"] == 1 and heart["hd95_images"] == heart["images"] - 1 == 5
    lo, hi = heart["dice_ci95"]
    assert lo <= heart["dice_mean"] <= hi < 1.0


def test_a_candidate_version_is_evaluated_and_its_card_gets_dice_and_hd95(tmp_path, capsys) -> None:
    """A checkpoint whose head makes most pixels positive loads beside the untrained serving version; the
    references are its own masks of three images. `--model segmentation@<v>` pins every request to it
    (Dice 1 everywhere, where the serving version's masks differ), `--record-card` puts Dice and HD95 on
    its card with the dataset's hash and size, and the serving version's card keeps no evaluation. With
    no --model, the serving one of the two loaded versions is evaluated."""
    import torch

    from cxr_segmentation.service import build_binding, build_model
    from cxr_serving.lifecycle import checkpoint_version
    from tests.support.servers import make_settings

    models = tmp_path / "models"
    models.mkdir()
    seg = {"enabled": True, "allow_untrained": True, "input_size": 64, "encoder": "resnet18"}
    net, _ = build_model(make_settings(models__segmentation=seg, performance__warmup_batches=0)).build(None)
    torch.nn.init.constant_(net.segmentation_head[0].bias, 5.0)
    torch.save(net.state_dict(), models / "seg.pt")
    version = checkpoint_version(models / "seg.pt")
    stack = Stack({"segmentation": build_binding}, server_config__max_batch_size=1, models_path=str(models)).start()
    try:

        async def setup() -> tuple[dict[str, dict[str, np.ndarray]], dict[str, int]]:
            async with AsyncCxrClient(stack.config()) as c:
                loaded = await c.load_model("segmentation", "segmentation", checkpoint_path="seg.pt", side_by_side=True)
                assert (loaded.version, loaded.role) == (version, "standby")
                out, area = {}, {"untrained": 0, version: 0}
                for p in cxr14_images(3):
                    r = await c.segment(p, model_name=f"segmentation@{version}")
                    assert r.model.version == version
                    out[p.stem] = {m.label: np.asarray(Image.open(io.BytesIO(m.png))) > 127 for m in r.masks}
                    area[version] += sum(m.area_pixels for m in r.masks)
                    area["untrained"] += sum(m.area_pixels for m in (await c.segment(p)).masks)
                return out, area

        candidate, area = asyncio.run(setup())
        assert area[version] > area["untrained"]  # the versions' masks differ: a wrong pin cannot score Dice 1
        masks = _write(tmp_path / "masks", candidate)
        report = _evaluate(stack, masks, tmp_path / "eval", "--model", f"segmentation@{version}", "--record-card")
        assert report["model"]["version"] == version and report["model_card"]["recorded"] is True
        assert [c["dice_mean"] for c in report["classes"]] == [1.0] * len(CLASSES)

        async def cards() -> tuple[Any, Any]:
            async with AsyncCxrClient(stack.config()) as c:
                pinned = await c.get_model_card("segmentation", f"segmentation@{version}")
                return pinned, await c.get_model_card("segmentation", "segmentation")

        card, serving = asyncio.run(cards())
        ev = card.evaluation
        assert card.version == version and ev.model_version == version
        assert ev.dataset_sha256 == report["dataset"]["sha256"] and ev.dataset_images == 3
        assert [c.class_name for c in ev.classes] == CLASSES and ev.macro_dice == 1.0
        for got, want in zip(ev.classes, report["classes"], strict=True):
            assert (got.images, got.dice_mean, got.hd95_images) == (3, 1.0, want["hd95_images"])
            if want["hd95_images"]:
                assert (got.hd95_mean, got.hd95_ci_low, got.hd95_ci_high) == (0.0, 0.0, 0.0)
        assert serving.version == "untrained" and not serving.HasField("evaluation")
        assert "no evaluation recorded" in serving.evaluation_note

        with pytest.MonkeyPatch.context() as mp:
            use_stack_env(stack, mp)
            capsys.readouterr()
            assert main(["models", "card", "segmentation", f"segmentation@{version}"]) == 0
        text = capsys.readouterr().out
        assert "3 images" in text and report["dataset"]["sha256"] in text and "macro Dice 1.000" in text
        assert all(c in text for c in CLASSES) and "HD95" in text

        default = _evaluate(stack, masks, tmp_path / "default")  # two versions loaded, no --model
        assert default["model"]["version"] == "untrained"
        assert [c["dice_mean"] for c in default["classes"]] != [1.0] * len(CLASSES)
    finally:
        stack.stop()
