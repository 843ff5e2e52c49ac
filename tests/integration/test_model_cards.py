"""Model cards (issue 26 item 3) through real services: the real classification service (DenseNet-121 at 64 px)
with a real checkpoint written from a fresh network's state_dict and a card file declared next to it, the
Kong stand-in in front of it for REST, `cxr evaluate --record-card` through the CLI, the DICOM node's SR and
FHIR builders fed the service's real reply, and the real segmentation service's in-memory card of an
untrained model.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
from pathlib import Path

import aiohttp
import grpc
import pydicom
import pytest
import torch
import torchvision

from cxr_classification.config import NIH_LABELS
from cxr_classification.service import build_binding
from cxr_client import AsyncCxrClient, ClientConfig
from cxr_client.cli import main
from cxr_client.errors import CxrClientError
from cxr_dicom.fhir import MODEL_CARD_PROPERTY, build_bundle
from cxr_dicom.sr import build_sr, read_sr
from cxr_dicom.worker import classification_results
from cxr_protos.common.v1 import common_pb2
from cxr_serving.lifecycle import checkpoint_version
from cxr_serving.model_card import IN_MEMORY, NOT_CLEARED, UNTRAINED_STATUS
from tests.support.gateway_helpers import running_gateway
from tests.support.paths import CXR14, DICOM_DIR
from tests.support.servers import TEST_KEY, make_settings, running_server

MULTI = "multiclass_classifier"
CARD_PATH = f"/v1/classification/models/{MULTI}/card"
DECLARED = {
    "intended_use": "Research triage of adult PA chest radiographs; not for diagnosis.",
    "training_data": "NIH ChestX-ray14 official train split, 86,524 images (declared by the loader)",
    "architecture": "densenet121",  # agrees with the loaded model
    "labels": ["Atelectasis", "Cardiomegaly"],  # contradicts it: flagged, never served
}
IMAGES = 40
READY_S = 600  # bounds for a contended CI machine: a DenseNet-121 load has taken over 60 s there


def _checkpoint(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    torch.save(torchvision.models.densenet121(weights=None, num_classes=14).state_dict(), path)
    return checkpoint_version(path)


def _settings(models_dir: Path):
    return make_settings(
        models_path=str(models_dir),
        models={MULTI: {"model_type": "densenet121", "allow_untrained": True, "input_size": 64}},
        server_config__max_batch_delay_ms=2,
        performance__warmup_batches=0,
    )


def _labels(dest: Path) -> Path:
    """The first IMAGES rows of the shared sample's labels (one 0/1 column per finding)."""
    with (CXR14 / "labels.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for _, r in zip(range(IMAGES), reader, strict=False)]
        fields = reader.fieldnames
    assert fields is not None
    out = dest / "labels.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return out


def _client_env(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    for k in ("CXR_ENDPOINT", "CXR_TLS", "CXR_TLS_ROOT_CERTS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("CXR_CLASSIFICATION_ENDPOINT", f"127.0.0.1:{port}")
    monkeypatch.setenv("CXR_API_KEY", TEST_KEY)
    monkeypatch.setenv("CXR_ADMIN_API_KEY", TEST_KEY)
    monkeypatch.setenv("CXR_TIMEOUT_S", str(READY_S))


@pytest.mark.timeout(1200)
async def test_card_round_trip_record_and_version_pinning(tmp_path, monkeypatch, capsys) -> None:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    ckpt = models_dir / "nih.pt"
    version = _checkpoint(ckpt, seed=1)
    card_file = models_dir / "nih.pt.card.json"
    card_file.write_text(json.dumps(DECLARED))
    s = _settings(models_dir)
    async with running_server(s, build_binding(s), wait_ready=False) as server:
        await server.wait_until_ready(READY_S)
        config = ClientConfig.model_validate(
            {
                "endpoints": {"classification": f"127.0.0.1:{server.port}"},
                "api_key": TEST_KEY,
                "admin_api_key": TEST_KEY,
                "timeout_s": READY_S,
            }
        )
        async with AsyncCxrClient(config) as c:
            loaded = await c.load_model("classification", MULTI, checkpoint_path="nih.pt")
            assert loaded.version == version and not loaded.untrained
            [info] = [m for m in await c.list_models("classification") if m.name == MULTI]
            # ListModels links to this version's card; the plain CARD_PATH is the serving version's alias
            assert info.model_card == f"/v1/classification/models/{MULTI}@{version}/card"

            card = await c.get_model_card("classification", MULTI)
            # derived fields are the loaded model's (ModelInfo's), declared ones come from the file
            assert (card.name, card.version, card.architecture, list(card.labels), card.task) == (
                info.name,
                info.version,
                info.architecture,
                list(info.labels),
                info.task,
            )
            assert list(card.labels) == list(NIH_LABELS) and card.version == version
            assert dict(card.preprocessing) == {
                "input_size": "64x64",
                "channels": "3",
                "resize": "center_crop",  # models.*.resize default of a DenseNet-121
                "normalization": "imagenet",
                "mean": "0.485, 0.456, 0.406",
                "std": "0.229, 0.224, 0.225",
                "input": "grayscale in [0, 1] (DICOM LUTs applied, MONOCHROME1 inverted)",
            }
            assert card.intended_use == DECLARED["intended_use"] and card.training_data == DECLARED["training_data"]
            assert card.regulatory_status == NOT_CLEARED and not card.untrained
            assert card.source == "nih.pt.card.json"  # relative to models_path: never the server's folder
            assert len(card.conflicts) == 1 and card.conflicts[0].startswith("labels: declared")
            assert not card.HasField("evaluation") and "no evaluation recorded" in card.evaluation_note
            assert len(card.digest) == 64

            # REST through the Kong stand-in: the same card
            async with (
                running_gateway({"classification": server.port}) as gw,
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{gw.ports.rest}{CARD_PATH}", headers={"apikey": TEST_KEY}) as r,
            ):
                assert r.status == 200, await r.text()
                rest = (await r.json())["card"]
            assert (rest["version"], rest["digest"], rest["intended_use"]) == (version, card.digest, card.intended_use)
            assert rest["preprocessing"] == dict(card.preprocessing) and rest["labels"] == list(NIH_LABELS)

            # results of another version are refused, and nothing is attached
            wrong = common_pb2.ModelEvaluation(model_version="untrained", dataset_sha256="ab" * 32, dataset_images=3)
            with pytest.raises(CxrClientError) as e:
                await c.record_model_evaluation("classification", MULTI, wrong)
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert e.value.reason == "EVALUATION_VERSION_MISMATCH"
            assert not (await c.get_model_card("classification", MULTI)).HasField("evaluation")

        # cxr evaluate --record-card records the summary on this version's card
        _client_env(monkeypatch, server.port)
        out = tmp_path / "eval"
        labels = _labels(tmp_path)
        args = ["evaluate", str(labels), str(CXR14 / "images"), "--out", str(out), "--model", MULTI]
        assert await asyncio.to_thread(main, [*args, "--bootstrap", "20", "--record-card"]) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["model"]["version"] == version and report["model_card"]["recorded"] is True
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["--json", "models", "card", "classification", MULTI]) == 0
        shown = json.loads(capsys.readouterr().out)
        ev = shown["evaluation"]
        assert ev["model_version"] == version
        assert ev["dataset_sha256"] == report["dataset"]["sha256"] and ev["dataset_images"] == IMAGES
        assert ev["evaluated_at"] == report["generated_at"]
        by_finding = {f["finding"]: f for f in ev["findings"]}
        assert set(by_finding) == {f["finding"] for f in report["findings"]}
        for f in report["findings"]:
            got = by_finding[f["finding"]]
            if f["auroc"] is None:
                assert got["auroc"] == "NaN"
            else:
                assert got["auroc"] == pytest.approx(f["auroc"])
                assert (got["auroc_ci_low"], got["auroc_ci_high"]) == pytest.approx(tuple(f["auroc_ci95"]))
            assert got["positives"] == f["positives"]
        stored = json.loads(card_file.read_text())
        assert stored["intended_use"] == DECLARED["intended_use"]  # the declaration is kept
        assert stored["evaluation"]["dataset_sha256"] == report["dataset"]["sha256"]

        # the same file replaced by other weights: a new version, and the old results are not attached
        new_version = _checkpoint(ckpt, seed=2)
        assert new_version != version
        async with AsyncCxrClient(config) as c:
            assert (await c.load_model("classification", MULTI, checkpoint_path="nih.pt")).version == new_version
            card = await c.get_model_card("classification", MULTI)
            assert card.version == new_version and not card.HasField("evaluation")
            assert version in card.evaluation_note and "not attached" in card.evaluation_note
            assert card.intended_use == DECLARED["intended_use"]

            # the DICOM node's SR and FHIR Device carry the card's path from the service's real reply
            reply = await c.classify(sorted((CXR14 / "images").glob("*.png"))[0], model_names=[MULTI])
            results = classification_results(reply)
            link = f"/v1/classification/models/{MULTI}@{new_version}/card"  # the version that answered
            assert [r.algorithm.model_card for r in results] == [link]
            source = pydicom.dcmread(DICOM_DIR / "nih-dx-mono2-8bit.dcm")
            sr = read_sr(bytes(_sr_bytes(source, results)))
            params = [i.TextValue for i in _walk(sr.ContentSequence) if _concept(i) == ("DCM", "111002")]
            assert f"model_card={link}" in params
            bundle = build_bundle(source, results)
            [device] = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Device"]
            assert device["property"] == [{"type": {"text": MODEL_CARD_PROPERTY}, "valueCode": [{"text": link}]}]


def _sr_bytes(source, results) -> bytes:
    from cxr_dicom.sr import sr_bytes

    return sr_bytes(build_sr(source, results))


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _concept(item) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return code.CodingSchemeDesignator, code.get("CodeValue") or code.get("LongCodeValue")


@pytest.mark.timeout(900)
async def test_untrained_segmentation_card_lives_in_memory(tmp_path) -> None:
    from cxr_segmentation.service import build_binding as segmentation

    s = make_settings(
        models={"segmentation": {"allow_untrained": True, "input_size": 64, "encoder": "resnet18"}},
        performance__warmup_batches=0,
    )
    async with running_server(s, segmentation(s), wait_ready=False) as server:
        await server.wait_until_ready(READY_S)
        config = ClientConfig.model_validate(
            {
                "endpoints": {"segmentation": f"127.0.0.1:{server.port}"},
                "api_key": TEST_KEY,
                "admin_api_key": TEST_KEY,
                "timeout_s": READY_S,
            }
        )
        async with AsyncCxrClient(config) as c:
            [info] = await c.list_models("segmentation")
            assert info.model_card == "/v1/segmentation/models/segmentation@untrained/card"
            card = await c.get_model_card("segmentation", "segmentation")
            assert card.untrained and card.version == "untrained" and card.source == IN_MEMORY
            assert card.regulatory_status == UNTRAINED_STATUS and card.training_data == "none: random weights"
            assert card.preprocessing["input_size"] == "64x64" and list(card.labels) == list(info.labels)
            evaluation = common_pb2.ModelEvaluation(
                model_version="untrained", dataset_sha256="cd" * 32, dataset_images=7, macro_auroc=math.nan
            )
            card = await c.record_model_evaluation("segmentation", "segmentation", evaluation)
            assert card.evaluation.dataset_sha256 == "cd" * 32 and card.evaluation.dataset_images == 7
            assert (await c.get_model_card("segmentation", "segmentation")).evaluation == card.evaluation
