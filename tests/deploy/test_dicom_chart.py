"""The DICOM node in the Helm chart: its queue on a PersistentVolumeClaim mounted at models.dicom.data_path, a
Recreate rollout (one ReadWriteOnce volume), the DIMSE port on its own Service, the STOW-RS port for Kong's
dicom-stow route; every value of dicom.persistence and dicom.dimse shows in the render, and each render is
valid Kubernetes (kubernetes-validate)."""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest

from cxr_gateway import kong_model
from tests.support.chart import CRD_KINDS, KUBE_VERSION, ROOT, Rendered, pod_spec, render

DIMSE_DEFAULT, STOW_DEFAULT = 11112, 8043  # cxr_dicom.config.DicomConfig's defaults


def _dicom_config(r: Rendered) -> dict[str, Any]:
    config = json.loads(r.get("ConfigMap", "cxr-config")["data"]["config.json"])
    return config


def _validate(r: Rendered) -> None:
    for obj in r.objects:
        if (obj["apiVersion"], obj["kind"]) not in CRD_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def _ports(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in obj["spec"]["ports"]}


def _rules_by_port(np: dict[str, Any]) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for rule in np["spec"]["ingress"]:
        for port in rule["ports"]:
            out.setdefault(port["port"], []).extend(rule.get("from") or [None])
    return out


def _kong_env(r: Rendered) -> dict[str, Any]:
    init = pod_spec(r.get("Deployment", "cxr-kong"))["initContainers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in init["env"]}


def _check_node(r: Rendered, *, claim: str, mount: str, dimse: int, stow: int) -> dict[str, Any]:
    """What every render must agree on: the queue volume at `mount`, the ports where config puts them, Recreate."""
    dep = r.get("Deployment", "cxr-dicom")
    spec = pod_spec(dep)
    (container,) = spec["containers"]
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert dep["spec"]["replicas"] == 1
    assert not r.has("HorizontalPodAutoscaler", "cxr-dicom") and not r.has("PodDisruptionBudget", "cxr-dicom")
    volume = next(v for v in spec["volumes"] if v["name"] == "queue")
    assert volume == {"name": "queue", "persistentVolumeClaim": {"claimName": claim}}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["queue"]["mountPath"] == mount and not mounts["queue"].get("readOnly")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (ports["dimse"], ports["stow"]) == (dimse, stow)

    svc = r.get("Service", "cxr-dicom-dimse")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert list(_ports(svc)) == ["dimse"]  # the gRPC API and metrics never go on the public DIMSE Service
    assert _ports(svc)["dimse"]["port"] == dimse and _ports(svc)["dimse"]["targetPort"] == "dimse"
    main = r.get("Service", "cxr-dicom")
    assert main["spec"]["type"] == "ClusterIP"
    assert _ports(main)["stow"]["port"] == stow and _ports(main)["stow"]["targetPort"] == "stow"

    # Kong's dicom-stow service, as `deck file render` fills it from the chart's env, reaches that Service port
    env = {k: v for k, v in _kong_env(r).items() if isinstance(v, str)}
    env |= {"DECK_CXR_API_KEY": "k", "DECK_CXR_ADMIN_API_KEY": "a"}  # from Secrets at run time
    kong = kong_model.parse((ROOT / "gateway" / "kong.yml").read_text(), env)
    stow_svc = kong.service("dicom-stow")
    assert (stow_svc.host, stow_svc.port) == ("cxr-dicom.cxr.svc", stow)

    rules = _rules_by_port(r.get("NetworkPolicy", "cxr-dicom"))
    kong_pods = {"podSelector": {"matchLabels": r.get("Deployment", "cxr-kong")["spec"]["selector"]["matchLabels"]}}
    assert rules[stow] == [kong_pods]
    return rules


def test_default_render_puts_the_queue_on_a_pvc_at_data_path_with_config_ports(default_render: Rendered) -> None:
    config = _dicom_config(default_render)
    dicom = config["models"]["dicom"]
    data_path = dicom["data_path"]
    assert data_path.startswith("/") and dicom["destinations"]["fhir_folder"].startswith(data_path + "/")
    rules = _check_node(
        default_render,
        claim="cxr-dicom-queue",
        mount=data_path,
        dimse=dicom.get("dimse_port", DIMSE_DEFAULT),
        stow=dicom.get("stow_port", STOW_DEFAULT),
    )
    assert rules[dicom.get("dimse_port", DIMSE_DEFAULT)] == [None]  # any source by default: modalities anywhere
    pvc = default_render.get("PersistentVolumeClaim", "cxr-dicom-queue")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"] and "storageClassName" not in pvc["spec"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert default_render.get("Service", "cxr-dicom-dimse")["spec"]["type"] == "ClusterIP"


def test_every_dicom_value_is_used_in_the_render() -> None:
    peers = [{"ipBlock": {"cidr": "10.20.0.0/16"}}, {"namespaceSelector": {"matchLabels": {"team": "pacs"}}}]
    values = {
        "config": {"models": {"dicom": {"dimse_port": 4242, "stow_port": 8080, "data_path": "queue"}}},
        "dicom": {
            "persistence": {"size": "50Gi", "storageClass": "fast-ssd", "accessModes": ["ReadWriteOncePod"]},
            "dimse": {
                "service": {
                    "type": "LoadBalancer",
                    "nodePort": 31112,
                    "loadBalancerSourceRanges": ["10.0.0.0/8"],
                    "externalTrafficPolicy": "Local",
                    "annotations": {"service.beta.kubernetes.io/aws-load-balancer-internal": "true"},
                },
                "allowedFrom": peers,
            },
        },
    }
    r = render(values)
    _validate(r)
    # a relative data_path is under the top-level data_path, as the node resolves it
    rules = _check_node(r, claim="cxr-dicom-queue", mount="/mnt/data/queue", dimse=4242, stow=8080)
    assert rules[4242] == peers
    pvc = r.get("PersistentVolumeClaim", "cxr-dicom-queue")["spec"]
    assert pvc["storageClassName"] == "fast-ssd" and pvc["accessModes"] == ["ReadWriteOncePod"]
    assert pvc["resources"]["requests"]["storage"] == "50Gi"
    svc = r.get("Service", "cxr-dicom-dimse")
    assert svc["spec"]["type"] == "LoadBalancer" and _ports(svc)["dimse"]["nodePort"] == 31112
    assert svc["spec"]["loadBalancerSourceRanges"] == ["10.0.0.0/8"]
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    assert svc["metadata"]["annotations"] == {"service.beta.kubernetes.io/aws-load-balancer-internal": "true"}
    assert _kong_env(r)["DECK_DICOM_STOW_PORT"] == "8080"

    node_port = render({"dicom": {"dimse": {"service": {"type": "NodePort", "nodePort": 30104}}}})
    _validate(node_port)
    spec = node_port.get("Service", "cxr-dicom-dimse")["spec"]
    assert (
        spec["type"] == "NodePort" and _ports(node_port.get("Service", "cxr-dicom-dimse"))["dimse"]["nodePort"] == 30104
    )
    assert "loadBalancerSourceRanges" not in spec


def test_an_existing_claim_replaces_the_chart_pvc() -> None:
    r = render({"dicom": {"persistence": {"existingClaim": "pacs-queue"}}})
    _validate(r)
    assert not r.has("PersistentVolumeClaim", "cxr-dicom-queue")
    _check_node(r, claim="pacs-queue", mount="/mnt/data/dicom", dimse=DIMSE_DEFAULT, stow=STOW_DEFAULT)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dicom": {"replicaCount": 2}}, "one replica only"),
        ({"dicom": {"autoscaling": {"enabled": True, "maxReplicas": 3}}}, "one replica only"),
        ({"config": {"models": {"dicom": {"dimse_port": 0}}}}, "need fixed ones"),
        ({"config": {"data_path": "", "models": {"dicom": {"data_path": "queue"}}}}, "absolute mount path"),
        ({"dicom": {"dimse": {"service": {"type": "ExternalName"}}}}, "type"),
        ({"dicom": {"persistence": {"sizee": "1Gi"}}}, "sizee"),
    ],
)
def test_settings_the_node_cannot_run_with_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render(values)
