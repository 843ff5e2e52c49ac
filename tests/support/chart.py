"""Render deploy/helm/cxr offline with helm-python-sdk (Helm's Go SDK, no helm binary) and
validate what comes out with kubernetes-validate."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "cxr"
EXAMPLES = CHART / "examples"
# The Kubernetes version the chart claims (Chart.yaml annotation cxr.ai/tested-kubernetes-version).
KUBE_VERSION = "1.30.0"
# The services the chart renders: its catalog, files/services.json (a link to cxr_serving's).
SERVICES = tuple(e["name"] for e in json.loads((CHART / "files" / "services.json").read_text())["services"])
# Custom resources kubernetes-validate has no schema for: checked structurally in the tests.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def load_values(*files: Path) -> dict[str, Any]:
    import helm_python as helm

    merged: dict[str, Any] = {}
    for f in files:
        merged = _deep_merge(merged, helm.values_from_yaml(f.read_text()))
    return merged


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class Rendered:
    """Every object of one `helm template`, indexed by (kind, name)."""

    objects: list[dict[str, Any]] = field(default_factory=list)

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for o in self.objects:
            if o["kind"] == kind and o["metadata"]["name"] == name:
                return o
        raise KeyError(f"{kind}/{name} not rendered; have {sorted(self.names(kind))}")

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def names(self, kind: str) -> set[str]:
        return {o["metadata"]["name"] for o in self.kinds(kind)}

    def has(self, kind: str, name: str) -> bool:
        return name in self.names(kind)


def render(
    values: dict[str, Any] | None = None, release: str = "cxr", namespace: str = "cxr", chart_dir: Path = CHART
) -> Rendered:
    import helm_python as helm

    with helm.Chart.load(chart_dir) as chart:
        manifests = chart.render(values or {}, name=release, namespace=namespace)
    out = Rendered()
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        out.objects.extend(d for d in yaml.safe_load_all(text) if d)
    return out


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]
