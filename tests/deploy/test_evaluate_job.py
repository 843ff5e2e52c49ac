"""The chart's `cxr evaluate` Job (evaluate.enabled), rendered offline: a valid batch/v1 Job whose command the
CLI's own parser accepts, the dataset read-only from a PVC or hostPath, the keys from the chart's Secrets, the
target Service's name and port from the config, and a NetworkPolicy that lets only the evaluated service in;
disabled (the default), nothing renders."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from cxr_client.cli import build_parser
from tests.support.chart import CRD_KINDS, KUBE_VERSION, Rendered, pod_spec, render

JOB = "cxr-evaluate"
EVALUATE = {
    "enabled": True,
    "model": "segmentation@0123abcd4567",
    "labels": "chest/masks",
    "images": "chest/images",
    "dataset": {"existingClaim": "site-evaluation-data"},
}


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def _grpc_peers(r: Rendered, svc: str) -> list[dict[str, Any]]:
    port = json.loads(r.get("ConfigMap", "cxr-config")["data"]["config.json"])["services"][svc]["port"]
    rules = r.get("NetworkPolicy", f"cxr-{svc}")["spec"]["ingress"]
    return [peer for rule in rules if port in [p["port"] for p in rule["ports"]] for peer in rule["from"]]


def test_disabled_by_default_renders_no_job() -> None:
    r = render()
    assert not r.kinds("Job") and not any(p.get("podSelector", {}).get("matchLabels", {}).get(
        "app.kubernetes.io/component") == "evaluate" for p in _grpc_peers(r, "segmentation"))  # fmt: skip


def test_enabled_renders_a_valid_job_running_cxr_evaluate_against_the_service() -> None:
    r = render({"evaluate": EVALUATE})
    job = r.get("Job", JOB)
    for obj in r.objects:
        if (obj["apiVersion"], obj["kind"]) not in CRD_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    assert job["apiVersion"] == "batch/v1" and job["spec"]["backoffLimit"] == 0
    spec = pod_spec(job)
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    (c,) = spec["containers"]
    assert c["image"].startswith("cxr/client:") and c["command"] == ["cxr", "evaluate"]
    assert c["args"] == [
        "/data/chest/masks", "/data/chest/images", "--out", "/results",
        "--model", "segmentation@0123abcd4567", "--task", "segmentation", "--record-card",
    ]  # fmt: skip
    args = build_parser().parse_args([c["command"][1], *c["args"]])  # the CLI accepts exactly this command
    assert (args.model, args.task, args.record_card, str(args.out)) == (
        "segmentation@0123abcd4567", "segmentation", True, "/results"
    )  # fmt: skip

    port = json.loads(r.get("ConfigMap", "cxr-config")["data"]["config.json"])["services"]["segmentation"]["port"]
    assert port in [p["port"] for p in r.get("Service", "cxr-segmentation")["spec"]["ports"]]
    env = _env(c)
    assert env["CXR_SEGMENTATION_ENDPOINT"] == f"cxr-segmentation:{port}"
    assert env["CXR_API_KEY"] == {"secretKeyRef": {"name": "cxr-api-keys", "key": "gateway-key"}}
    assert env["CXR_ADMIN_API_KEY"] == {"secretKeyRef": {"name": "cxr-admin-api-keys", "key": "gateway-key"}}

    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["dataset"] == {"name": "dataset", "mountPath": "/data", "readOnly": True}
    assert mounts["results"]["mountPath"] == "/results"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dataset"]["persistentVolumeClaim"] == {"claimName": "site-evaluation-data", "readOnly": True}
    assert "emptyDir" in volumes["results"]

    # the Job's pods, and only they, get through the evaluated service's NetworkPolicy besides Kong
    labels = job["spec"]["template"]["metadata"]["labels"]
    selectors = [p["podSelector"]["matchLabels"] for p in _grpc_peers(r, "segmentation") if "podSelector" in p]
    assert labels in selectors
    assert labels not in [p.get("podSelector", {}).get("matchLabels") for p in _grpc_peers(r, "classification")]


def test_host_path_results_claim_and_no_card() -> None:
    values = EVALUATE | {
        "service": "classification",
        "model": "multiclass_classifier",
        "labels": "labels.csv",
        "images": "images",
        "recordCard": False,
        "extraArgs": ["--bootstrap", "2000"],
        "dataset": {"hostPath": "/srv/evaluation"},
        "results": {"existingClaim": "evaluation-results"},
    }
    r = render({"evaluate": values})
    spec = pod_spec(r.get("Job", JOB))
    (c,) = spec["containers"]
    assert c["args"] == [
        "/data/labels.csv", "/data/images", "--out", "/results",
        "--model", "multiclass_classifier", "--task", "classification", "--bootstrap", "2000",
    ]  # fmt: skip
    assert "CXR_ADMIN_API_KEY" not in _env(c) and "CXR_CLASSIFICATION_ENDPOINT" in _env(c)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dataset"]["hostPath"] == {"path": "/srv/evaluation", "type": "Directory"}
    assert volumes["results"]["persistentVolumeClaim"] == {"claimName": "evaluation-results"}
    kubernetes_validate.validate(r.get("Job", JOB), KUBE_VERSION, strict=True)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"dataset": {}}, "evaluate.dataset: set exactly one"),
        ({"dataset": {"existingClaim": "a", "hostPath": "/b"}}, "evaluate.dataset: set exactly one"),
        ({"model": ""}, "evaluate.model"),
    ],
)
def test_an_incomplete_job_is_refused_at_render(override: dict[str, Any], message: str) -> None:
    with pytest.raises(Exception, match=message):
        render({"evaluate": EVALUATE | override})
