"""`cxr evaluate` through a real classification service (untrained DenseNet-121 at 64 px, client_stack's
thresholds: Effusion 2**-20, every other finding 1.0) on the shared NIH sample, and the thresholds it
chooses applied by LoadModel.

The sample's Hernia images are left out of the label file, so Hernia has no positive case and must be
reported as not estimable. Everything goes through the CLI (`cxr_client.cli.main`), which calls the
Python API (`cxr_client.evaluation.evaluate`) over the public ClassifyImage RPC.
"""

from __future__ import annotations

import csv
import hashlib
import json
from html.parser import HTMLParser
from pathlib import Path

import grpc
import numpy as np
import pytest

from cxr_client import AsyncCxrClient
from cxr_client.cli import main
from cxr_client.errors import CxrClientError
from cxr_client.evaluation import NOT_HELD_OUT, THRESHOLDS_SCHEMA, read_labels
from tests.support.client_stack import NIH, POSITIVE, Stack, use_stack_env
from tests.support.paths import CXR14

MODEL = "multiclass_classifier"
DROPPED = "Hernia"  # its positives are left out: not estimable
TARGET = 0.9
# Chance AUROC of one finding with ~20-60 positives among ~290 images has a standard error of ~0.04-0.07;
# the macro mean over 13 findings averages that down. 0.1 is ~3 standard errors of that mean away from
# 0.5: an untrained model passes, while a model that ranks the findings (AUROC 0.7+) or inverts them fails.
MACRO_AUROC_BOUND = 0.1


@pytest.fixture(scope="module")
def stack():
    from cxr_classification.service import build_binding

    # one image per forward: a batch's other images change the last digits of a probability, and the
    # thresholds chosen from one run must give the same calls in the next
    s = Stack({"classification": build_binding}, server_config__max_batch_size=1).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[str]]:
    """The shared sample's labels rewritten in the NIH `Finding Labels` format, without the Hernia images."""
    out = tmp_path_factory.mktemp("labels") / "Data_Entry.csv"
    with (CXR14 / "labels.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r[DROPPED] == "0"]
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels", "Patient ID"])
        for r in rows:
            w.writerow([r["image"], "|".join(x for x in NIH if r[x] == "1") or "No Finding", r["patient_id"]])
    return out, [r["image"] for r in rows]


def _env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    use_stack_env(stack, monkeypatch)


@pytest.fixture(scope="module")
def first_run(stack, dataset, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        _env(stack, mp)
        rc = main(
            [
                "evaluate",
                str(dataset[0]),
                str(CXR14 / "images"),
                "--out",
                str(out),
                "--model",
                MODEL,
                "--bootstrap",
                "300",
                "--seed",
                "5",
                "--choose-thresholds",
                f"sensitivity={TARGET}",
            ]
        )
    assert rc == 0
    return out, json.loads((out / "report.json").read_text())


class _Html(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_report_of_an_untrained_model_on_the_nih_sample(first_run, dataset) -> None:
    out, report = first_run
    labels, images = dataset
    assert report["model"] == {"name": MODEL, "version": "untrained", "untrained": True, "architecture": "densenet121"}
    h = hashlib.sha256(labels.read_bytes())
    for name in images:
        data = (CXR14 / "images" / name).read_bytes()
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    assert report["dataset"]["sha256"] == h.hexdigest()
    assert report["dataset"]["images"] == len(images) == 290
    assert report["dataset"]["label_format"] == "nih"
    assert any("UNTRAINED" in n for n in report["notes"])

    by = {f["finding"]: f for f in report["findings"]}
    assert list(by) == NIH
    hernia = by[DROPPED]
    assert hernia["positives"] == 0 and hernia["not_estimable"] == "no positive cases in the data"
    assert hernia["auroc"] is None and hernia["auroc_ci95"] is None and hernia["sensitivity"] is None
    estimable = [f for f in report["findings"] if f["finding"] != DROPPED]
    for f in estimable:
        lo, hi = f["auroc_ci95"]
        assert 0.0 <= lo <= f["auroc"] <= hi <= 1.0, f
        assert f["positives"] > 0 and f["negatives"] > 0
        assert 0.0 <= f["ece"] <= 1.0 and sum(f["reliability"]["counts"]) == 290
    assert abs(report["macro_auroc"] - 0.5) <= MACRO_AUROC_BOUND, report["macro_auroc"]
    assert report["macro_auroc"] == pytest.approx(np.mean([f["auroc"] for f in estimable]))
    # the service's thresholds: Effusion's tiny one calls every image positive, 1.0 none
    assert by[POSITIVE]["threshold"] == pytest.approx(2**-20)
    assert (by[POSITIVE]["sensitivity"], by[POSITIVE]["specificity"]) == (1.0, 0.0)
    assert by["Atelectasis"]["threshold"] == 1.0
    assert (by["Atelectasis"]["sensitivity"], by["Atelectasis"]["specificity"]) == (0.0, 1.0)

    md = (out / "report.md").read_text()
    assert "UNTRAINED" in md and "not estimable" in md and report["dataset"]["sha256"] in md
    parser = _Html()
    parser.feed((out / "report.html").read_text())
    assert len(parser.images) == 14 and all(s.startswith("data:image/png;base64,") for s in parser.images)
    for f in report["findings"]:
        assert (out / f"reliability_{f['finding']}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_column_format_gives_the_same_truth(dataset) -> None:
    nih = read_labels(dataset[0], NIH)
    columns = read_labels(CXR14 / "labels.csv", NIH)
    keep = [columns.images.index(name) for name in nih.images]
    assert columns.source_format == "columns"
    assert (columns.truth[keep] == nih.truth).all()


def test_chosen_thresholds_reach_the_sensitivity_and_load_model_applies_them(
    first_run, stack, monkeypatch, tmp_path
) -> None:
    out, report = first_run
    chosen = report["chosen_thresholds"]
    assert NOT_HELD_OUT in report["notes"] and "not held out" in chosen["measured_on"]
    assert "not held out" in (out / "report.md").read_text()
    assert set(chosen["thresholds"]) == set(NIH) - {DROPPED} and DROPPED in chosen["skipped"]
    for label, v in chosen["thresholds"].items():
        assert v["sensitivity"] >= TARGET, (label, v)
    file = out / f"thresholds-{MODEL}-untrained.json"
    spec = json.loads(file.read_text())
    assert spec["kind"] == THRESHOLDS_SCHEMA and spec["model_version"] == "untrained"
    assert spec["dataset"] == {"sha256": report["dataset"]["sha256"], "images": 290}
    assert spec["thresholds"] == {label: v["threshold"] for label, v in chosen["thresholds"].items()}

    use_stack_env(stack, monkeypatch)
    assert main(["models", "load", "classification", MODEL, "--thresholds", str(file)]) == 0
    again = tmp_path / "again"
    dataset_csv = report["dataset"]["labels"]
    assert main(["evaluate", dataset_csv, str(CXR14 / "images"), "--out", str(again), "--bootstrap", "10"]) == 0
    after = {f["finding"]: f for f in json.loads((again / "report.json").read_text())["findings"]}
    for label, v in chosen["thresholds"].items():
        # the service now compares with the chosen threshold: its own calls give exactly the chosen operating point
        assert after[label]["threshold"] == pytest.approx(v["threshold"], rel=1e-6)
        assert (after[label]["sensitivity"], after[label]["specificity"]) == pytest.approx(
            (v["sensitivity"], v["specificity"])
        )
        assert after[label]["sensitivity"] >= TARGET
    assert after[DROPPED]["threshold"] == 1.0  # not chosen: the configured threshold stays


async def test_load_model_refuses_bad_thresholds_and_keeps_serving(stack) -> None:
    async with AsyncCxrClient(stack.config()) as c:
        with pytest.raises(CxrClientError) as e:
            await c.load_model("classification", MODEL, thresholds={"Effusion": 0.3}, thresholds_model_version="abc")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "THRESHOLDS_VERSION_MISMATCH" in str(
            e.value.reason
        )
        for bad, reason in (
            ({"NotALabel": 0.3}, "THRESHOLDS_UNKNOWN_LABEL"),
            ({"Effusion": 0.0}, "THRESHOLDS_OUT_OF_RANGE"),
        ):
            with pytest.raises(CxrClientError) as e:
                await c.load_model("classification", MODEL, thresholds=bad, thresholds_model_version="untrained")
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.reason == reason
        with pytest.raises(CxrClientError) as e:
            await c.load_model("classification", MODEL, thresholds={"Effusion": 0.3})
        assert e.value.reason == "THRESHOLDS_VERSION_MISSING"
        [m] = [m for m in await c.list_models("classification") if m.name == MODEL]
        assert m.state == 3  # READY: a refused load leaves the model serving
        # a load with thresholds sets them; a load without returns to the configured ones
        await c.load_model("classification", MODEL, thresholds={"Effusion": 0.75}, thresholds_model_version="untrained")
        image = sorted((CXR14 / "images").glob("*.png"))[0]
        r = await c.classify(image, model_names=[MODEL])
        assert {f.label: f.threshold for f in r.predictions[0].findings}["Effusion"] == pytest.approx(0.75)
        await c.load_model("classification", MODEL)
        r = await c.classify(image, model_names=[MODEL])
        assert {f.label: f.threshold for f in r.predictions[0].findings}["Effusion"] == pytest.approx(2**-20)
