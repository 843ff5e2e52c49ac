"""The `cxr` CLI, the analyze workflow and the clients against the three real services."""

from __future__ import annotations

import json

import pytest

from cxr_client import AsyncCxrClient, CxrClient, InvalidImageError
from cxr_client.analyze import StudyReport, _add_literature, analyze_study, literature_query
from cxr_client.cli import main
from cxr_client.errors import from_status
from tests.support.client_stack import POSITIVE, get_stack, use_stack_env
from tests.support.paths import cxr14_images, dicom_files

# One stack of the three real services for the process (~25-35 s to start on 2 busy cores).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack():
    return get_stack("real")


@pytest.fixture
def env(stack, monkeypatch):
    return use_stack_env(stack, monkeypatch)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


async def test_analyze_study_full_report(stack):
    async with AsyncCxrClient(stack.config()) as client:
        report = await analyze_study(client, dicom_files()[0], top_k=2)
    assert report.positive_findings == [POSITIVE]
    assert len(report.findings) == 15  # abnormal + 14 NIH findings, with thresholds
    assert {m.name for m in report.models} == {"binary_classifier", "multiclass_classifier", "segmentation"}
    assert all(m.version == "untrained" and m.untrained for m in report.models)
    assert report.untrained and "UNTRAINED" in report.warnings[0]
    assert report.errors == {}
    # the stack's 20 passages hold nothing on pleural effusion: no reference above the default floor, said so
    assert report.literature == []
    assert report.literature_notes[POSITIVE].startswith("no reference above the relevance floor 0.45 (best similarity")
    assert report.image["format"] == "dcm"
    assert report.measurements is not None and report.overlay_png
    assert literature_query("Pleural_Thickening").startswith("pleural thickening: ")

    report = StudyReport(study="s", generated_at="t", positive_findings=[POSITIVE, "Pneumothorax"])
    async with AsyncCxrClient(stack.config()) as client:
        await _add_literature(client, report, 2, 5, None, floor=0.1)
    refs = report.literature
    assert refs and report.literature_notes == {} and report.errors == {}
    assert [ref.number for ref in refs] == list(range(1, len(refs) + 1))
    assert len({ref.source for ref in refs}) == len(refs)  # one reference per PMID, chunks merged
    assert all(ref.source.startswith("PMID:") and ref.score >= 0.1 and ref.excerpt for ref in refs)
    per_finding = {f: [r for r in refs if f in (r.finding, *r.also_for)] for f in (POSITIVE, "Pneumothorax")}
    assert all(1 <= len(v) <= 2 for v in per_finding.values()), per_finding


def test_cli_health_all_serving(env, capsys):
    rc, out, _ = run_cli(capsys, "health")
    assert rc == 0 and out.count("SERVING") == 4  # classification, segmentation, rag, dicom


def test_cli_ask_answer_and_search(env, capsys):
    rc, out, _ = run_cli(capsys, "ask", "Is routine chest radiography useful after bronchoscopy?")
    assert rc == 0 and "[1]" in out and "extractive" in out
    rc, streamed, _ = run_cli(capsys, "ask", "Is routine chest radiography useful after bronchoscopy?", "--stream")
    assert rc == 0 and "[1]" in streamed and len(streamed.split("\n\n")[0]) > 20
    rc, out, _ = run_cli(capsys, "--json", "ask", "pleural effusion", "--search-only", "--top-k", "2")
    assert rc == 0 and len(json.loads(out)["passages"]) == 2


def test_cli_analyze_json_and_models(env, capsys):
    argv = ["analyze", str(cxr14_images(1)[0]), "--format", "json", "--top-k", "1", "--reference-floor", "0.2"]
    rc, out, _ = run_cli(capsys, *argv)
    data = json.loads(out)
    assert rc == 0 and data["positive_findings"] == [POSITIVE]
    assert len(data["literature"]) == 1 and data["literature_notes"] == {}  # the default 0.45 would refuse
    assert data["disclaimer"].startswith("Not for diagnosis")
    rc, out, _ = run_cli(capsys, "models", "list", "--service", "classification")
    assert rc == 0 and "binary_classifier" in out and "multiclass_classifier" in out and "densenet121" in out


def test_sync_client_batch_with_per_item_errors(stack):
    with CxrClient(stack.config()) as client:
        resp = client.classify_images([cxr14_images(1)[0], b"junk"], model_names=["multiclass_classifier"])
        ok, bad = sorted(resp.results, key=lambda r: r.index)
        assert ok.predictions[0].model.name == "multiclass_classifier"
        err = from_status(bad.error)
        assert isinstance(err, InvalidImageError) and err.reason == "IMAGE_FORMAT_UNKNOWN"
        streamed = client.stream_classify_images([b"junk", *cxr14_images(2)], model_names=["binary_classifier"])
        assert sorted(m.result.index for m in streamed) == [0, 1, 2]
        by_index = {m.result.index: m.result for m in streamed}
        assert from_status(by_index[0].error).reason == "IMAGE_FORMAT_UNKNOWN"
        assert by_index[2].predictions[0].model.name == "binary_classifier"
        passages = client.search_literature("chest radiograph", top_k=2).passages
        assert len(passages) == 2
        chunks = client.stream_answer("pneumothorax after biopsy")
        assert chunks[0].passages and "".join(c.text_delta for c in chunks)


def test_cli_analyze_with_heatmaps(env, capsys, tmp_path):
    out = tmp_path / "rep"
    rc, _, err = run_cli(capsys, "analyze", str(cxr14_images(2)[1]), "--out", str(out), "--heatmaps", "--top-k", "1")
    assert rc == 0, err
    heatmap = out / f"heatmap_{POSITIVE}.png"
    assert heatmap.read_bytes().startswith(b"\x89PNG")
    assert f"![Grad-CAM {POSITIVE}](heatmap_{POSITIVE}.png)" in (out / "report.md").read_text()
    assert f"Grad-CAM: {POSITIVE}" in (out / "report.html").read_text()
    assert "heatmaps" not in json.loads((out / "report.json").read_text())


def test_cli_admin_commands_send_the_admin_key(env, capsys, monkeypatch, tmp_path):
    """models unload/load and ingest on the real services, with the stack's admin key (distinct from
    the inference key); without an admin key they stop before calling and the model stays READY."""
    rc, out, err = run_cli(capsys, "--json", "models", "unload", "segmentation", "segmentation")
    assert rc == 0, err
    assert json.loads(out)["state"] == "MODEL_STATE_UNLOADED"
    rc, out, err = run_cli(capsys, "--json", "models", "load", "segmentation", "segmentation")
    assert rc == 0, err
    assert json.loads(out)["state"] == "MODEL_STATE_READY"
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "admin-key-e2e", "title": "t", "text": "Zygomycosis quokka marker."}) + "\n")
    rc, out, err = run_cli(capsys, "--json", "ingest", str(docs))
    assert rc == 0, err
    assert json.loads(out)["documents_received"] == 1
    monkeypatch.delenv("CXR_ADMIN_API_KEY")
    rc, _, err = run_cli(capsys, "models", "unload", "segmentation", "segmentation")
    assert rc == 2 and "UnloadModel is an admin call" in err
    rc, out, _ = run_cli(capsys, "--json", "models", "list", "--service", "segmentation")
    assert rc == 0 and [m["state"] for m in json.loads(out)] == ["MODEL_STATE_READY"]


def test_cli_admin_command_with_an_inference_key_is_refused_by_the_service(env, capsys, monkeypatch):
    """The services' admin role: the inference key, configured as the admin key, gets ADMIN_REQUIRED."""
    monkeypatch.setenv("CXR_ADMIN_API_KEY", env.env()["CXR_API_KEY"])
    rc, _, err = run_cli(capsys, "models", "unload", "segmentation", "segmentation")
    assert rc == 1 and "PERMISSION_DENIED" in err and "ADMIN_REQUIRED" in err
    rc, out, _ = run_cli(capsys, "--json", "models", "list", "--service", "segmentation")
    assert rc == 0 and [m["state"] for m in json.loads(out)] == ["MODEL_STATE_READY"]
