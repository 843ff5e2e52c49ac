"""Monitoring files: promtool (Debian's prometheus package) checks the rules, their unit tests
and the scrape config; the Grafana dashboard and the alerts only use metrics that a live
service really exports (scraped from the toy service on the real runtime)."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.common.v1 import common_pb2
from tests.support.chart import ROOT
from tests.support.servers import auth, make_settings, running_server
from tests.support.toy_service import build_toy

MONITORING = ROOT / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "cxr-dashboard.json"
METRIC_RE = re.compile(r"(?<![:\w])(cxr_[a-z0-9_]+)")


@pytest.fixture(scope="session")
def promtool() -> Path:
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "fetch_promtool.sh")], capture_output=True, text=True, timeout=240
    )
    if proc.returncode == 3:
        pytest.skip(f"promtool unavailable here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip())


def _run(promtool: Path, *args: str) -> str:
    proc = subprocess.run([str(promtool), *args], capture_output=True, text=True, cwd=MONITORING, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_promtool_checks_rules_config_and_rule_unit_tests(promtool: Path) -> None:
    out = _run(promtool, "check", "rules", "alerts.yml")
    assert "SUCCESS" in out
    out = _run(promtool, "check", "config", "prometheus.yml")
    assert "valid prometheus config file" in out
    out = _run(promtool, "test", "rules", "alerts_test.yml")
    assert "SUCCESS" in out and "FAILED" not in out


def test_alerts_cover_the_operational_signals() -> None:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    expected = {
        "CxrModelNotLoaded": "cxr_model_loaded",
        "CxrHighErrorRate": 'code!="OK"',
        "CxrHighP99Latency": "histogram_quantile(0.99",
        "CxrGpuMemoryHigh": "cxr_gpu_memory_used_bytes",
        "CxrQueueSaturated": "cxr_queue_depth",
        "CxrRequestsShed": "cxr_requests_shed_total",
        "CxrPixelKernelsMissing": "cxr_pixel_kernels_built",
        "CxrDicomDeadLetters": 'cxr_dicom_queue_depth{state="dead"}',
        "CxrDicomQueueStuck": "cxr_dicom_time_to_result_seconds_count",
    }
    for name, needle in expected.items():
        assert needle in alerts[name]["expr"], name
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@pytest.fixture
async def exported_metrics(sample_png: bytes) -> set[str]:
    """Names a real service exposes on its metrics port (families and their sample names). The rag and DICOM
    services' own families are registered on the shared registry when imported, as in their processes."""
    import grpc

    import cxr_dicom.metrics  # noqa: F401
    import cxr_rag.metrics  # noqa: F401
    from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc

    settings = make_settings()
    async with running_server(settings, build_toy(settings)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.ClassificationServiceStub(ch)
            image = common_pb2.Image(data=sample_png, content_type="image/png")
            await stub.ClassifyImage(pb.ClassifyImageRequest(image=image), metadata=auth(), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.ClassifyImage(pb.ClassifyImageRequest(image=image, model_names=["bad"]), metadata=auth())
        assert server.metrics is not None
        url = f"http://127.0.0.1:{server.metrics.port}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
    names: set[str] = set()
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}
    for family in text_string_to_metric_families(body):
        if family.name.startswith("cxr_"):
            names.add(family.name)
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
            names.update(s.name for s in family.samples)
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def test_dashboard_parses_and_has_unique_ids(dashboard: dict) -> None:
    assert dashboard["uid"] == "cxr-suite" and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) > 10
    for p in dashboard["panels"]:
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]


def test_dashboard_and_alerts_only_use_exported_metrics(dashboard: dict, exported_metrics: set[str]) -> None:
    used = {m for e in _dashboard_exprs(dashboard) for m in METRIC_RE.findall(e)}
    assert used, "no cxr_ metric in the dashboard"
    assert used <= exported_metrics, sorted(used - exported_metrics)
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    in_alerts = {m for g in rules["groups"] for r in g["rules"] for m in METRIC_RE.findall(r["expr"])}
    assert {"cxr_model_loaded", "cxr_queue_depth", "cxr_dicom_queue_depth"} <= in_alerts
    assert in_alerts <= exported_metrics, sorted(in_alerts - exported_metrics)
    # and the dashboard shows every family the runtime exports
    families = {m for m in exported_metrics if not m.endswith(("_bucket", "_sum", "_count", "_total", "_created"))}
    shown = {m for m in families if any(u == m or u.startswith(m + "_") for u in used)}
    assert shown == families, sorted(families - shown)
