"""The metric code of `cxr evaluate` against scikit-learn and hand-computed values, the two label formats,
and the threshold choice, on fixed data (no service)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr_client.cli import build_parser, cmd_evaluate
from cxr_client.errors import PermissionDeniedError
from cxr_client.evaluation import (
    _youden_cut,
    auroc,
    bootstrap_auroc_ci,
    choose_threshold,
    parse_rule,
    read_labels,
    reliability,
    sensitivity_specificity,
)

FINDINGS = ["Atelectasis", "Effusion", "Hernia"]


def _fixed(n: int = 200, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    score = np.round(rng.random(n) * 0.6 + 0.3 * y, 2)  # rounded: many ties, informative but noisy
    return y.astype(int), score.astype(np.float32)


def test_auroc_equals_sklearn_with_ties() -> None:
    y, score = _fixed()
    assert len(np.unique(score)) < len(score)  # ties present
    assert auroc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert auroc(y, -score) == pytest.approx(roc_auc_score(y, -score), abs=1e-12)
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([0, 1], [0.5, 0.5]) == 0.5


def test_auroc_refuses_one_class() -> None:
    with pytest.raises(ValueError):
        auroc([0, 0, 0], [0.1, 0.2, 0.3])


def test_bootstrap_ci_contains_estimate_and_is_seeded() -> None:
    y, score = _fixed()
    point = auroc(y, score)
    lo, hi = bootstrap_auroc_ci(y, score, n=300, random_seed=7)
    assert lo < point < hi
    assert 0.0 < hi - lo < 0.3
    assert bootstrap_auroc_ci(y, score, n=300, random_seed=7) == (lo, hi)
    assert bootstrap_auroc_ci(y, score, n=300, random_seed=8) != (lo, hi)


def test_sensitivity_specificity_and_not_estimable() -> None:
    y = np.array([1, 1, 1, 0, 0])
    called = np.array([1, 0, 1, 1, 0])
    assert sensitivity_specificity(y, called) == (pytest.approx(2 / 3), pytest.approx(1 / 2))
    assert sensitivity_specificity(np.zeros(3), np.zeros(3)) == (None, 1.0)
    assert sensitivity_specificity(np.ones(3), np.ones(3)) == (1.0, None)


def test_ece_by_hand() -> None:
    # bins of width 0.5: [0, 0.5) holds 0.1, 0.2 (rate 0.5, mean 0.15); [0.5, 1] holds 0.9, 1.0 (rate 1, mean 0.95)
    rel = reliability(np.array([0, 1, 1, 1]), np.array([0.1, 0.2, 0.9, 1.0]), bins=2)
    assert rel.counts == [2, 2]
    assert rel.ece == pytest.approx(0.5 * abs(0.5 - 0.15) + 0.5 * abs(1.0 - 0.95))
    assert reliability(np.array([0, 1]), np.array([0.0, 1.0]), bins=10).ece == 0.0


def test_nih_format_and_columns(tmp_path) -> None:
    nih = tmp_path / "nih.csv"
    nih.write_text(
        "Image Index,Finding Labels,Patient ID\na.png,Effusion|Atelectasis,1\nb.png,No Finding,2\nc.png,Hernia,3\n"
    )
    t = read_labels(nih, FINDINGS)
    assert (t.images, t.findings, t.source_format) == (["a.png", "b.png", "c.png"], FINDINGS, "nih")
    assert t.truth.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]
    cols = tmp_path / "cols.csv"
    cols.write_text("image,age,Atelectasis,Effusion\na.png,55,1,0\nb.png,61,0,1\n")
    t = read_labels(cols, FINDINGS)
    assert (t.findings, t.source_format, t.truth.tolist()) == (["Atelectasis", "Effusion"], "columns", [[1, 0], [0, 1]])
    t = read_labels(nih, ["abnormal", "Effusion"])  # the binary model's label: any finding
    assert t.truth.tolist() == [[1, 1], [0, 0], [1, 0]]
    cols.write_text("image,Effusion,no_finding\na.png,1,0\nb.png,0,1\n")
    t = read_labels(cols, ["abnormal"])
    assert (t.findings, t.truth.tolist()) == (["abnormal"], [[1], [0]])
    bad = tmp_path / "bad.csv"
    bad.write_text("image,Effusion\na.png,yes\n")
    with pytest.raises(ValueError, match="row 2"):
        read_labels(bad, FINDINGS)
    contradictory = tmp_path / "contradictory.csv"
    contradictory.write_text("Image Index,Finding Labels\na.png,No Finding|Effusion\n")
    with pytest.raises(ValueError, match="No Finding"):
        read_labels(contradictory, FINDINGS)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 1.0])
def test_sensitivity_threshold_reaches_target_and_is_the_highest(target: float) -> None:
    y, score = _fixed()
    t = choose_threshold(y, score, "sensitivity", target)
    sens, _ = sensitivity_specificity(y, score >= np.float32(t))
    assert sens is not None and sens >= target
    cut = score[score >= np.float32(t)].min()  # the score the threshold sits below
    lower = score[score < cut]
    assert len(lower) == 0 or lower.max() < t < cut  # halfway in the gap: same calls, margin both sides
    above = score[score > cut]
    if len(above):  # the next score up no longer reaches the target: the cut is the highest that does
        sens_up, _ = sensitivity_specificity(y, score >= above.min())
        assert sens_up is not None and sens_up < target


def test_youden_threshold_maximises_j() -> None:
    y, score = _fixed()
    t = choose_threshold(y, score, "youden", None)
    best = max(
        (lambda s, p: s + p - 1)(*sensitivity_specificity(y, score >= c))  # type: ignore[operator]
        for c in np.unique(score)
    )
    sens, spec = sensitivity_specificity(y, score >= np.float32(t))
    assert sens + spec - 1 == pytest.approx(best)  # type: ignore[operator]


def test_threshold_never_zero() -> None:
    t = choose_threshold(np.array([1, 0]), np.array([0.0, 0.0], dtype=np.float32), "sensitivity", 1.0)
    assert 0.0 < t < 1e-30


def test_parse_rule() -> None:
    assert parse_rule("sensitivity=0.9") == ("sensitivity", 0.9)
    assert parse_rule("youden") == ("youden", None)
    for bad in ("sensitivity=0", "specificity=0.9", "sensitivity=1.5"):
        with pytest.raises(ValueError):
            parse_rule(bad)
    assert parse_rule("sensitivity=1") == ("sensitivity", 1.0)


# -- the run, through a stand-in classification client (the real service runs in
# tests/integration/test_evaluate.py; these cases need answers it cannot be made to give on cue) --------


class _StandIn:
    """Answers ClassifyImage from a table keyed by the image bytes: (probability, threshold) per label."""

    def __init__(self, answers: dict[bytes, dict[str, tuple[float, float]]], *, refuse_record: bool = False) -> None:
        self.answers = answers
        self.refuse_record = refuse_record
        self.calls = 0
        self.recorded = 0
        self.asked: set[str] = set()  # the model names the requests named

    async def list_models(self, service: str) -> list[SimpleNamespace]:
        labels = list(next(iter(self.answers.values())))
        return [SimpleNamespace(name="m", labels=labels, version="v1", role="serving")]

    async def classify(self, data: bytes, model_names: list[str]) -> SimpleNamespace:
        self.calls += 1
        self.asked.update(model_names)
        findings = [
            SimpleNamespace(label=label, probability=p, threshold=t, positive=p >= t)
            for label, (p, t) in self.answers[data].items()
        ]
        model = SimpleNamespace(name="m", version="v1", untrained=False, architecture="toy")
        return SimpleNamespace(predictions=[SimpleNamespace(model=model, findings=findings)])

    async def record_model_evaluation(self, service: str, model: str, evaluation: object) -> SimpleNamespace:
        if self.refuse_record:
            raise PermissionDeniedError("admin key required", reason="ADMIN_REQUIRED")
        self.recorded += 1
        return SimpleNamespace(source="card", digest="d")


def _folder(tmp_path: Path, rows: list[tuple[str, str]], n_labels: int = 1) -> tuple[Path, Path]:
    """A label CSV (NIH format) and an images folder whose i-th PNG holds the bytes b'img<i>'."""
    images = tmp_path / "images"
    images.mkdir()
    for i, (name, _) in enumerate(rows):
        (images / name).write_bytes(f"img{i}".encode())
    labels = tmp_path / "labels.csv"
    labels.write_text("Image Index,Finding Labels\n" + "".join(f"{n},{f}\n" for n, f in rows))
    return labels, images


ROWS = [("a.png", "A"), ("b.png", "No Finding"), ("c.png", "A"), ("d.png", "No Finding")]
PROBS = [0.9, 0.2, 0.6, 0.4]


def _answers(thresholds: list[float] | None = None) -> dict[bytes, dict[str, tuple[float, float]]]:
    ts = thresholds or [0.5] * len(PROBS)
    return {f"img{i}".encode(): {"A": (p, t)} for i, (p, t) in enumerate(zip(PROBS, ts, strict=True))}


def _evaluate_cli(client: _StandIn, labels: Path, images: Path, out: Path, *extra: str) -> int:
    args = build_parser().parse_args(
        ["evaluate", str(labels), str(images), "--out", str(out), "--model", "m", "--bootstrap", "20", *extra]
    )
    return asyncio.run(cmd_evaluate(client, args))  # type: ignore[arg-type]


def test_refused_record_card_keeps_the_written_evaluation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels, images = _folder(tmp_path, ROWS)
    client = _StandIn(_answers(), refuse_record=True)
    out = tmp_path / "out"
    rc = _evaluate_cli(client, labels, images, out, "--record-card")
    assert rc == 3  # EVALUATION_NOT_RECORDED
    assert "warning" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["findings"][0]["auroc"] == 1.0
    assert report["model_card"]["recorded"] is False and "admin key required" in report["model_card"]["error"]
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    accepted = _StandIn(_answers())
    assert _evaluate_cli(accepted, labels, images, tmp_path / "ok", "--record-card") == 0
    assert accepted.recorded == 1
    assert accepted.asked == {"m@v1"}  # `--model m` pins the version ListModels says serves
    assert json.loads((tmp_path / "ok" / "report.json").read_text())["model_card"]["recorded"] is True


def test_threshold_between_adjacent_float32_scores_adds_no_positive_call() -> None:
    rounded_down = 0
    for base in (0.5, 0.3, 0.7, 0.123, 0.9, 0.0625, 0.999):
        cut = np.float32(base)
        lower = np.nextafter(cut, np.float32(0))
        halfway = np.float32((float(cut) + float(lower)) / 2.0)
        rounded_down += bool(halfway == lower)
        y, prob = np.array([1, 0]), np.array([cut, lower], dtype=np.float32)
        for rule, target in (("sensitivity", 1.0), ("youden", None)):
            t = choose_threshold(y, prob, rule, target)
            assert list(prob >= np.float32(t)) == [True, False], (base, rule, t)
    assert rounded_down > 0  # the case the guard is for occurs among these values


def test_threshold_changed_mid_run_is_refused(tmp_path: Path) -> None:
    labels, images = _folder(tmp_path, ROWS)
    client = _StandIn(_answers([0.5, 0.5, 0.7, 0.7]))  # same version, the threshold reloaded halfway
    with pytest.raises(ValueError, match=r"changed the threshold of 'A'.*0\.5.*0\.69"):
        _evaluate_cli(client, labels, images, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert _evaluate_cli(_StandIn(_answers()), labels, images, tmp_path / "same") == 0


def test_nih_names_that_are_not_model_labels_are_refused(tmp_path: Path) -> None:
    nih = tmp_path / "nih.csv"
    nih.write_text("Image Index,Finding Labels\na.png,Effusion\nb.png,No Finding\nc.png,Pneumonia|Effusion\n")
    with pytest.raises(ValueError, match=r"row 4 lists \['Pneumonia'\]"):
        read_labels(nih, FINDINGS)
    assert read_labels(nih, ["abnormal"]).truth.tolist() == [[1], [0], [1]]  # the binary label counts any finding
    nothing = tmp_path / "nothing.csv"
    nothing.write_text("Image Index,Finding Labels\na.png,No Finding\nb.png,No Finding\n")
    with pytest.raises(ValueError, match="no row lists any of the model's labels"):
        read_labels(nothing, FINDINGS)


@pytest.mark.parametrize("flag", [["--bootstrap", "0"], ["--seed", "-1"], ["--concurrency", "0"], ["--bins", "0"]])
def test_bad_settings_are_refused_before_any_image_is_classified(tmp_path: Path, flag: list[str]) -> None:
    labels, images = _folder(tmp_path, ROWS)
    client = _StandIn(_answers())
    with pytest.raises(ValueError, match=flag[0].lstrip("-")):
        _evaluate_cli(client, labels, images, tmp_path / "out", *flag)
    assert client.calls == 0


def test_sensitivity_target_missed_by_positives_at_zero_is_recorded(tmp_path: Path) -> None:
    rows = [("a.png", "A"), ("b.png", "A"), ("c.png", "No Finding"), ("d.png", "No Finding")]
    answers = {f"img{i}".encode(): {"A": (p, 0.5)} for i, p in enumerate([0.8, 0.0, 0.3, 0.1])}
    labels, images = _folder(tmp_path, rows)
    out = tmp_path / "out"
    assert _evaluate_cli(_StandIn(answers), labels, images, out, "--choose-thresholds", "sensitivity=1.0") == 0
    chosen_a = json.loads((out / "report.json").read_text())["chosen_thresholds"]["thresholds"]["A"]
    assert chosen_a["sensitivity"] == 0.5 and chosen_a["target_reached"] is False
    thresholds = json.loads((out / "thresholds-m-v1.json").read_text())
    assert thresholds["target_reached"] == {"A": False}
    assert len(thresholds["notes"]) == 1 and "1 positive(s) score exactly 0" in thresholds["notes"][0]
    for page in ("report.md", "report.html"):
        assert "misses the target 1.0" in (out / page).read_text()
    answers[b"img1"] = {"A": (0.2, 0.5)}  # the same positive above 0: the target is reached, no note
    ok = tmp_path / "ok"
    assert _evaluate_cli(_StandIn(answers), labels, images, ok, "--choose-thresholds", "sensitivity=1.0") == 0
    assert json.loads((ok / "thresholds-m-v1.json").read_text())["target_reached"] == {"A": True}
    assert json.loads((ok / "thresholds-m-v1.json").read_text())["notes"] == []


@pytest.mark.parametrize("name", ["../secret.png", "ABSOLUTE"])
def test_image_names_outside_the_images_folder_are_refused(tmp_path: Path, name: str) -> None:
    labels, images = _folder(tmp_path, ROWS)
    (tmp_path / "secret.png").write_bytes(b"img0")  # a readable file next to the folder, answered like a.png
    name = str(tmp_path / "secret.png") if name == "ABSOLUTE" else name
    labels.write_text(labels.read_text().replace("a.png", name))
    client = _StandIn(_answers())
    with pytest.raises(ValueError, match="outside"):
        _evaluate_cli(client, labels, images, tmp_path / "out")
    assert client.calls == 0


def test_plot_files_of_labels_that_sanitise_alike_do_not_collide(tmp_path: Path) -> None:
    answers = {f"img{i}".encode(): {"A/B": (p, 0.5), "A B": (1 - p, 0.5)} for i, p in enumerate(PROBS)}
    rows = [("a.png", "A/B"), ("b.png", "A B"), ("c.png", "A/B"), ("d.png", "A B")]
    labels, images = _folder(tmp_path, rows)
    out = tmp_path / "out"
    assert _evaluate_cli(_StandIn(answers), labels, images, out) == 0
    plots = sorted(p.name for p in out.glob("reliability_*.png"))
    assert len(plots) == 2
    markdown = (out / "report.md").read_text()
    assert all(f"({name})" in markdown for name in plots)


def test_never_positive_label_is_not_shown_as_a_measurement(tmp_path: Path) -> None:
    nan = float("nan")  # the service applies no threshold to B: never positive
    answers = {f"img{i}".encode(): {"A": (p, 0.5), "B": (p, nan)} for i, p in enumerate(PROBS)}
    rows = [("a.png", "A|B"), ("b.png", "No Finding"), ("c.png", "A"), ("d.png", "B")]
    labels, images = _folder(tmp_path, rows)
    out = tmp_path / "out"
    assert _evaluate_cli(_StandIn(answers), labels, images, out) == 0
    b = next(f for f in json.loads((out / "report.json").read_text())["findings"] if f["finding"] == "B")
    assert b["sensitivity"] == 0.0 and "threshold_note" in b
    for page in ("report.md", "report.html"):
        text = (out / page).read_text()
        assert "B: the service applies no threshold to this label (never positive)" in text
        assert text.count("no threshold (never positive)") == 2  # B's sensitivity and specificity cells


def _youden_per_score(y: np.ndarray, prob: np.ndarray) -> float:
    """The selection as first written: one pass over the data per distinct score, O(n²)."""
    y = y.astype(bool)
    best, cut = -2.0, 1.0
    for cand in np.unique(prob)[::-1]:
        called = prob >= cand
        j = called[y].mean() + (~called[~y]).mean() - 1.0
        if j > best + 1e-12:
            best, cut = float(j), float(cand)
    return cut


@pytest.mark.parametrize("seed", range(8))
def test_youden_sorted_scan_equals_the_per_score_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    y = rng.random(n) < rng.uniform(0.05, 0.6)
    y[:2] = [True, False]  # both classes
    prob = rng.random(n).astype(np.float32) * 0.7 + 0.3 * y
    if seed % 2:  # many ties, and runs of tied positives and negatives
        prob = np.round(prob, 1).astype(np.float32)
    assert _youden_cut(y, prob) == _youden_per_score(y.astype(int), prob)


def test_every_report_states_it_is_not_cleared_for_clinical_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cxr_client.evaluation import REPORT_STATUS

    labels, images = _folder(tmp_path, ROWS)
    out = tmp_path / "out"
    assert _evaluate_cli(_StandIn(_answers()), labels, images, out) == 0
    assert capsys.readouterr().out.splitlines()[0] == REPORT_STATUS
    assert REPORT_STATUS.startswith("NOT CLEARED FOR CLINICAL USE: not validated")
    assert json.loads((out / "report.json").read_text())["status"] == REPORT_STATUS
    assert (out / "report.md").read_text().splitlines()[2] == f"**{REPORT_STATUS}**"  # under the title
    assert f'<p class="status"><strong>{REPORT_STATUS}</strong></p>' in (out / "report.html").read_text()


class _Loader:
    """Records LoadModel calls instead of making them."""

    def __init__(self) -> None:
        self.loads: list[tuple[str, dict]] = []

    async def load_model(self, service: str, model: str, **kwargs: object) -> object:
        from cxr_protos.common.v1 import common_pb2

        self.loads.append((model, dict(kwargs)))
        return common_pb2.ModelInfo(name=model, state=common_pb2.MODEL_STATE_READY, version="v1")


def test_a_thresholds_file_loads_only_into_the_model_it_was_chosen_for(tmp_path: Path) -> None:
    from cxr_client.cli import cmd_models

    labels, images = _folder(tmp_path, ROWS)
    out = tmp_path / "out"
    assert _evaluate_cli(_StandIn(_answers()), labels, images, out, "--choose-thresholds", "youden") == 0
    file = out / "thresholds-m-v1.json"
    loader = _Loader()
    other = build_parser().parse_args(["models", "load", "classification", "other", "--thresholds", str(file)])
    with pytest.raises(ValueError, match="chosen for model 'm', not 'other'"):
        asyncio.run(cmd_models(loader, other))  # type: ignore[arg-type]
    assert loader.loads == []
    same = build_parser().parse_args(["models", "load", "classification", "m", "--thresholds", str(file)])
    assert asyncio.run(cmd_models(loader, same)) == 0  # type: ignore[arg-type]
    [(model, kwargs)] = loader.loads
    assert model == "m" and kwargs["thresholds_model_version"] == "v1" and set(kwargs["thresholds"]) == {"A"}
