"""The `cxr` CLI and the analyze workflow against real servers: the toy classifier and the real
segmentation service, with NO rag service (its endpoint is a closed port). Proves the report
keeps what succeeded and says what failed."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from cxr_client import AsyncCxrClient, InvalidImageError
from cxr_client.analyze import DISCLAIMER, UNTRAINED_WARNING, analyze_study
from cxr_client.cli import main
from cxr_client.report import to_html, to_markdown, write_report
from tests.support.client_stack import get_stack, use_stack_env
from tests.support.paths import cxr14_images


@pytest.fixture(scope="module")
def stack():
    return get_stack("partial")


@pytest.fixture
def env(stack, monkeypatch):
    return use_stack_env(stack, monkeypatch)


@pytest.fixture(scope="module")
def white_png(tmp_path_factory) -> Path:
    """Mean brightness 1.0: the toy model's one finding ("bright") is positive."""
    path = tmp_path_factory.mktemp("img") / "white.png"
    buf = io.BytesIO()
    Image.new("L", (256, 256), 255).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


async def test_analyze_keeps_results_when_rag_is_down(stack, white_png):
    async with AsyncCxrClient(stack.config(timeout_s=5)) as client:
        report = await analyze_study(client, white_png)
    assert report.positive_findings == ["bright"]
    assert report.findings[0].probability == pytest.approx(1.0) and report.findings[0].threshold == 0.5
    assert report.measurements is not None and report.anatomy  # segmentation worked
    assert report.overlay_png and report.overlay_png.startswith(b"\x89PNG")
    assert {m.service for m in report.models} == {"classification", "segmentation"}
    assert all(m.version for m in report.models)
    assert "rag" in report.errors and "UNAVAILABLE" in report.errors["rag"]
    assert report.literature == []
    assert report.untrained and report.warnings[0] == UNTRAINED_WARNING
    assert any(w.startswith("rag failed") for w in report.warnings)
    assert report.disclaimer == DISCLAIMER
    md = to_markdown(report, overlay_path="overlay.png")
    assert DISCLAIMER in md and "UNTRAINED MODEL" in md and "| bright | 1.000 | 0.500 | **yes** |" in md
    assert "![segmentation overlay](overlay.png)" in md
    page = to_html(report)
    assert "data:image/png;base64," in page and "Not for diagnosis" in page
    assert "<script" not in page


async def test_analyze_raises_for_a_refused_image(stack):
    async with AsyncCxrClient(stack.config()) as client:
        with pytest.raises(InvalidImageError) as err:
            await analyze_study(client, b"definitely not an image")
    assert err.value.reason == "IMAGE_FORMAT_UNKNOWN"


def test_write_report_files(stack, white_png, tmp_path):
    import asyncio

    async def go():
        async with AsyncCxrClient(stack.config(timeout_s=5)) as client:
            return await analyze_study(client, white_png)

    paths = write_report(asyncio.run(go()), tmp_path / "r")
    assert set(paths) == {"json", "markdown", "html", "overlay"}
    data = json.loads(paths["json"].read_text())
    assert data["positive_findings"] == ["bright"] and "overlay_png" not in data
    assert "overlay.png" in paths["markdown"].read_text()


def test_cli_classify_table_and_json(env, capsys, tmp_path):
    images = cxr14_images(2)
    rc, out, _ = run_cli(capsys, "classify", *map(str, images))
    assert rc == 0
    assert out.splitlines()[0].split() == ["image", "model", "label", "prob", "thresh", "positive"]
    assert images[0].name in out and "toy (untrained)" in out
    rc, out, _ = run_cli(capsys, "--json", "classify", str(images[0]))
    data = json.loads(out)
    assert data[0]["file"] == str(images[0]) and data[0]["predictions"][0]["model"]["name"] == "toy"


def test_cli_classify_reports_a_bad_file_and_exits_1(env, capsys, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    rc, out, _ = run_cli(capsys, "classify", str(bad), str(cxr14_images(1)[0]))
    assert rc == 1 and "ERROR" in out and "IMAGE_FORMAT_UNKNOWN" in out


def test_cli_segment_writes_masks(env, capsys, tmp_path):
    img = cxr14_images(1)[0]
    rc, out, _ = run_cli(capsys, "segment", str(img), "--out", str(tmp_path / "masks"), "--overlay")
    assert rc == 0 and "cardiothoracic ratio" in out and "untrained" in out
    written = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert f"{img.stem}_heart.png" in written and f"{img.stem}_overlay.png" in written
    mask = Image.open(tmp_path / "masks" / f"{img.stem}_heart.png")
    assert mask.size == (512, 512)


def test_cli_models_and_health(env, capsys):
    rc, out, _ = run_cli(capsys, "models", "list")
    assert rc == 0 and "toy" in out and "segmentation" in out and "ready" in out
    rc, out, _ = run_cli(capsys, "--json", "health")
    data = json.loads(out)
    assert rc == 1  # rag is down
    assert data["classification"]["status"] == "SERVING" and data["rag"]["status"] == "UNREACHABLE"


def test_cli_analyze_writes_report(env, capsys, tmp_path, white_png):
    rc, out, err = run_cli(capsys, "analyze", str(white_png), "--out", str(tmp_path / "rep"))
    assert rc == 0 and out.startswith("# Chest X-ray study report: white.png")
    assert "wrote" in err and (tmp_path / "rep" / "report.html").is_file()


def test_cli_errors_are_readable(env, capsys, monkeypatch):
    monkeypatch.setenv("CXR_API_KEY", "wrong-key")
    rc, out, _ = run_cli(capsys, "classify", str(cxr14_images(1)[0]))
    assert rc == 1 and "API_KEY_INVALID" in out  # per-image error row
    rc, out, err = run_cli(capsys, "--json", "models", "list", "--service", "classification")
    assert rc == 1 and "UNAUTHENTICATED" in err
    rc, out, err = run_cli(capsys, "--json", "segment", str(cxr14_images(1)[0]))
    assert rc == 1 and json.loads(out)["error"]["reason"] == "API_KEY_INVALID"
