"""Who reaches what in the rendered chart: the admin keys come from a Secret of their own (never
the inference keys' Secret), and the metrics ports are open to the monitoring namespace only."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest

from tests.support.chart import KUBE_VERSION, SERVICES, Rendered, pod_spec, render

MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _secret_texts(r: Rendered, name: str) -> list[str]:
    return [base64.b64decode(v).decode() for v in r.get("Secret", name)["data"].values()]


def _secret_volumes(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}


# ---------------------------------------------------------------- admin keys


def test_admin_keys_render_into_their_own_secret(dev_render: Rendered, dev_values: dict) -> None:
    admin, inference = dev_values["adminApiKeys"]["keys"], dev_values["apiKeys"]["keys"]
    assert admin and inference and not set(admin) & set(inference)
    secret = dev_render.get("Secret", "cxr-admin-api-keys")
    kubernetes_validate.validate(secret, KUBE_VERSION, strict=True)
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {"admin-api-keys": "\n".join(admin) + "\n", "gateway-key": admin[0]}
    # the inference Secret holds no admin key, the admin Secret no inference key
    for text in _secret_texts(dev_render, "cxr-api-keys"):
        assert not any(k in text for k in admin)
    assert not any(k in text for text in data.values() for k in inference)


@pytest.mark.parametrize("values", ["dev", "default", "production"])
def test_each_service_reads_the_admin_key_file_from_the_admin_secret(
    values: str, dev_render: Rendered, default_render: Rendered, prod_render: Rendered
) -> None:
    r = {"dev": dev_render, "default": default_render, "production": prod_render}[values]
    for svc in SERVICES:
        spec = pod_spec(r.get("Deployment", f"cxr-{svc}"))
        container = spec["containers"][0]
        env = _env(container)
        volumes = _secret_volumes(spec)
        # exactly one volume carries the admin Secret, and it is not the inference keys' volume
        admin_volumes = [n for n, s in volumes.items() if s["secretName"] == "cxr-admin-api-keys"]
        assert admin_volumes == ["admin-api-keys"], svc
        assert volumes["api-keys"]["secretName"] == "cxr-api-keys"
        assert [i["key"] for i in volumes["api-keys"]["items"]] == ["api-keys"]
        (item,) = volumes["admin-api-keys"]["items"]
        assert item["key"] == "admin-api-keys"
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        mount = mounts["admin-api-keys"]
        # a directory mount (no subPath) so a rotated key reaches the pod; its own directory
        assert "subPath" not in mount and mount["readOnly"] is True
        assert mount["mountPath"] != mounts["api-keys"]["mountPath"]
        assert env["CXR_ADMIN_API_KEY_FILE"] == f"{mount['mountPath']}/{item['path']}", svc
        # never the key itself in the pod spec, never a reference into the inference Secret
        assert "CXR_ADMIN_API_KEY" not in env
        refs = [v["secretKeyRef"]["name"] for v in env.values() if isinstance(v, dict) and "secretKeyRef" in v]
        assert "cxr-api-keys" not in refs


def test_the_admin_secret_can_be_an_existing_one() -> None:
    r = render({"adminApiKeys": {"existingSecret": "ops-cxr-admin"}})
    assert not r.has("Secret", "cxr-admin-api-keys") and not r.has("Secret", "ops-cxr-admin")
    for svc in SERVICES:
        volumes = _secret_volumes(pod_spec(r.get("Deployment", f"cxr-{svc}")))
        assert volumes["admin-api-keys"]["secretName"] == "ops-cxr-admin"
    kong = _env(pod_spec(r.get("Deployment", "cxr-kong"))["initContainers"][0])
    assert kong["DECK_CXR_ADMIN_API_KEY"] == {"secretKeyRef": {"name": "ops-cxr-admin", "key": "gateway-key"}}


def test_kong_admin_consumer_key_comes_from_the_admin_secret(dev_render: Rendered) -> None:
    env = _env(pod_spec(dev_render.get("Deployment", "cxr-kong"))["initContainers"][0])
    assert env["DECK_CXR_ADMIN_API_KEY"] == {"secretKeyRef": {"name": "cxr-admin-api-keys", "key": "gateway-key"}}
    assert env["DECK_CXR_API_KEY"] == {"secretKeyRef": {"name": "cxr-api-keys", "key": "gateway-key"}}


def test_the_service_settings_take_the_admin_key_file_from_the_pod_env(dev_render: Rendered, tmp_path) -> None:
    """What the pod starts with (ConfigMap + env) makes the admin key file the one the chart mounts."""
    from cxr_serving.settings import load_settings

    path = tmp_path / "config.json"
    path.write_text(dev_render.get("ConfigMap", "cxr-config")["data"]["config.json"])
    container = pod_spec(dev_render.get("Deployment", "cxr-rag"))["containers"][0]
    env = {k: v for k, v in _env(container).items() if isinstance(v, str)}
    settings = load_settings(path, environ=env)
    assert str(settings.security.admin_api_key_file) == env["CXR_ADMIN_API_KEY_FILE"]
    assert settings.security.admin_api_key_file != settings.security.api_key_file


def test_with_authentication_off_the_pods_start_without_an_admin_key_file(tmp_path) -> None:
    """The service refuses admin keys when authentication is off, so the chart must not hand it one."""
    from cxr_serving.settings import load_settings

    r = render({"config": {"security": {"enable_authentication": False}}})
    path = tmp_path / "config.json"
    path.write_text(r.get("ConfigMap", "cxr-config")["data"]["config.json"])
    for svc in SERVICES:
        container = pod_spec(r.get("Deployment", f"cxr-{svc}"))["containers"][0]
        env = {k: v for k, v in _env(container).items() if isinstance(v, str)}
        assert "CXR_ADMIN_API_KEY_FILE" not in env, svc
        settings = load_settings(path, environ=env)
        assert settings.security.enable_authentication is False and settings.security.admin_api_key_file is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {
                "apiKeys": {"existingSecret": "", "keys": ["shared-key-0123456789"]},
                "adminApiKeys": {"existingSecret": "", "keys": ["shared-key-0123456789"]},
            },
            "an admin key must not also be an inference key",
        ),
        ({"adminApiKeys": {"existingSecret": "cxr-api-keys"}}, "the admin keys need a Secret of their own"),
        ({"adminApiKeys": {"mountPath": "/etc/cxr/secrets"}}, "adminApiKeys.mountPath must differ"),
        ({"adminApiKeys": {"existingSecret": ""}}, "authentication is on but no admin key is configured"),
    ],
)
def test_admin_key_guards(values: dict, message: str) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(values)


def test_schema_keeps_admin_keys_out_of_the_config_map() -> None:
    from tests.support.chart import CHART

    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError, match=re.escape("/config/security/admin_api_keys")):
            chart.validate_schema({"config": {"security": {"admin_api_keys": ["0123456789abcdef0123"]}}})
        with pytest.raises(helm.HelmValuesError, match=re.escape("/adminApiKeys/keys")):
            chart.validate_schema({"adminApiKeys": {"keys": ["short"]}})


# ---------------------------------------------------------------- metrics ports (item 7)


def _rules_by_port(np: dict[str, Any]) -> dict[int, list[dict[str, Any] | None]]:
    """Port -> the peers allowed to reach it (None: a rule without `from`, i.e. everyone)."""
    out: dict[int, list[dict[str, Any] | None]] = {}
    for rule in np["spec"]["ingress"]:
        assert rule.get("ports"), f"a rule without ports opens every port: {rule}"
        for port in rule["ports"]:
            out.setdefault(port["port"], []).extend(rule.get("from") or [None])
    return out


def test_metrics_ports_are_open_to_the_monitoring_namespace_only(default_render: Rendered) -> None:
    config = json.loads(default_render.get("ConfigMap", "cxr-config")["data"]["config.json"])
    kong_pods = {
        "podSelector": {"matchLabels": default_render.get("Deployment", "cxr-kong")["spec"]["selector"]["matchLabels"]}
    }
    for svc in SERVICES:
        ep = config["services"][svc]
        np = default_render.get("NetworkPolicy", f"cxr-{svc}")
        assert np["spec"]["policyTypes"] == ["Ingress"]
        by_port = _rules_by_port(np)
        # the DICOM node also takes STOW-RS from Kong and DIMSE from modalities (tests/deploy/test_dicom_chart.py)
        node = config["models"]["dicom"] if svc == "dicom" else {}
        extra = {node.get("stow_port", 8043), node.get("dimse_port", 11112)} if node else set()
        assert set(by_port) == {ep["port"], ep["metrics_port"]} | extra, svc
        assert by_port[ep["metrics_port"]] == [MONITORING], svc
        assert by_port[ep["port"]] == [kong_pods], svc
    # Kong's status port (its /metrics) too; its proxy ports stay public
    kong = _rules_by_port(default_render.get("NetworkPolicy", "cxr-kong"))
    assert kong[8100] == [MONITORING] and kong[8000] == [None] and kong[8443] == [None]


def test_the_monitoring_namespace_is_a_value() -> None:
    selector = {"matchLabels": {"kubernetes.io/metadata.name": None, "team": "observability"}}
    r = render({"networkPolicy": {"monitoringNamespaceSelector": selector}})
    wanted = {"namespaceSelector": {"matchLabels": {"team": "observability"}}}
    config = json.loads(r.get("ConfigMap", "cxr-config")["data"]["config.json"])
    for svc in SERVICES:
        by_port = _rules_by_port(r.get("NetworkPolicy", f"cxr-{svc}"))
        assert by_port[config["services"][svc]["metrics_port"]] == [wanted], svc
    assert _rules_by_port(r.get("NetworkPolicy", "cxr-kong"))[8100] == [wanted]


@pytest.mark.parametrize(
    "selector",
    [
        {"matchLabels": None},  # {} after Helm's merge: every namespace
        {"matchLabels": {"kubernetes.io/metadata.name": None}},  # matchLabels: {}
        {"matchLabels": None, "matchExpressions": []},
    ],
)
def test_an_empty_monitoring_selector_is_refused(selector: dict) -> None:
    """An empty namespaceSelector matches every namespace: the metrics ports would be open cluster-wide."""
    with pytest.raises(helm.HelmError, match=re.escape("networkPolicy.monitoringNamespaceSelector: name at least")):
        render({"networkPolicy": {"monitoringNamespaceSelector": selector}})


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_loopback_bind_address_is_refused(host: str) -> None:
    """In a pod, Prometheus (and the kubelet, and Kong) reach the pod IP: a loopback bind would make the
    metrics port unreachable while the NetworkPolicy looks right."""
    with pytest.raises(helm.HelmError, match=re.escape(f"config.services.rag.host: {host} is the pod's loopback")):
        render({"config": {"services": {"rag": {"host": host}}}})
