"""The Helm chart, rendered offline for three values sets (defaults, CPU-only dev, production
with three GPU pools): lint, Kubernetes schema validation, and the properties that matter."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from cxr_serving.settings import load_settings
from tests.support.chart import (
    CHART,
    CRD_KINDS,
    EXAMPLES,
    KUBE_VERSION,
    ROOT,
    SERVICES,
    Rendered,
    load_values,
    pod_spec,
    render,
)

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "CronJob")


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(obj)
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _config(r: Rendered) -> dict[str, Any]:
    return json.loads(r.get("ConfigMap", "cxr-config")["data"]["config.json"])


# ---------------------------------------------------------------- lint and schema validation


@pytest.mark.parametrize("values_file", [None, "values-dev-cpu.yaml", "values-production.yaml"])
def test_helm_lint_is_clean(values_file: str | None) -> None:
    values = load_values(EXAMPLES / values_file) if values_file else None
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_every_rendered_object_is_valid_kubernetes(any_render: Rendered) -> None:
    crds = 0
    for obj in any_render.objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            crds += 1
            assert obj["metadata"]["name"] and obj["spec"], obj
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert len(any_render.objects) > crds >= 0


def test_default_render_has_the_whole_suite(default_render: Rendered) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for svc in SERVICES:
        for kind in ("Deployment", "Service", "NetworkPolicy", "ServiceMonitor"):
            assert default_render.has(kind, f"cxr-{svc}"), (kind, svc)
        # the DICOM node is one replica writing its queue: no autoscaler, no disruption budget by default
        scaled = values[svc]["autoscaling"]["enabled"]
        assert default_render.has("HorizontalPodAutoscaler", f"cxr-{svc}") == scaled, svc
        assert default_render.has("PodDisruptionBudget", f"cxr-{svc}") == values[svc]["pdb"]["enabled"], svc
    assert {s for s in SERVICES if values[s]["autoscaling"]["enabled"]} == {"classification", "segmentation", "rag"}
    assert default_render.has("Deployment", "cxr-vllm") and default_render.has("StatefulSet", "cxr-chroma")
    assert default_render.has("CronJob", "cxr-chroma-backup") and default_render.has("Deployment", "cxr-kong")
    assert default_render.has("PrometheusRule", "cxr")


# ---------------------------------------------------------------- scheduling and GPUs


def test_production_places_each_workload_on_its_pool(prod_render: Rendered) -> None:
    pools = {
        "cxr-classification": "gpu-classification",
        "cxr-segmentation": "gpu-segmentation",
        "cxr-vllm": "gpu-llm",
        "cxr-rag": "cpu-general",
    }
    for name, pool in pools.items():
        spec = pod_spec(prod_render.get("Deployment", name))
        assert spec["nodeSelector"]["cxr.ai/pool"] == pool, name
        if pool.startswith("gpu-"):
            tolerated = {(t["key"], t.get("value")) for t in spec["tolerations"]}
            assert ("cxr.ai/pool", pool) in tolerated and ("nvidia.com/gpu", None) in tolerated, name
            assert "nvidia.com/gpu.product" in spec["nodeSelector"], name
        else:
            assert not spec.get("tolerations"), name
    gpu_pools = {pod_spec(prod_render.get("Deployment", n))["nodeSelector"]["cxr.ai/pool"] for n in pools}
    assert len({p for p in gpu_pools if p.startswith("gpu-")}) == 3


def test_gpu_limits_and_device(default_render: Rendered, prod_render: Rendered, dev_render: Rendered) -> None:
    for r in (default_render, prod_render):
        for svc, gpus in (("classification", 1), ("segmentation", 1), ("vllm", 4)):
            c = pod_spec(r.get("Deployment", f"cxr-{svc}"))["containers"][0]
            assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus, svc
            if svc != "vllm":
                assert _env(c)["CXR_DEVICE"] == "cuda"
        rag = pod_spec(r.get("Deployment", "cxr-rag"))["containers"][0]
        assert "nvidia.com/gpu" not in rag["resources"].get("limits", {})
        assert _env(rag)["CXR_DEVICE"] == "cpu"
    assert "--tensor-parallel-size=4" in pod_spec(prod_render.get("Deployment", "cxr-vllm"))["containers"][0]["args"]
    for obj in dev_render.kinds("Deployment"):
        for c in _containers(obj):
            assert "nvidia.com/gpu" not in json.dumps(c.get("resources", {})), obj["metadata"]["name"]
        assert not pod_spec(obj).get("nodeSelector"), obj["metadata"]["name"]
    for svc in SERVICES:
        assert _env(pod_spec(dev_render.get("Deployment", f"cxr-{svc}"))["containers"][0])["CXR_DEVICE"] == "cpu"
    assert not dev_render.has("Deployment", "cxr-vllm")


# ---------------------------------------------------------------- probes, config, secrets


def test_service_probes_are_native_grpc_with_a_long_startup(any_render: Rendered) -> None:
    config = _config(any_render)
    for svc in SERVICES:
        c = pod_spec(any_render.get("Deployment", f"cxr-{svc}"))["containers"][0]
        port = config["services"][svc]["port"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": port, "service": ""}, (svc, probe)
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, svc
        node = config["models"]["dicom"] if svc == "dicom" else {}  # the DICOM node's intakes too
        intakes = {"dimse": node.get("dimse_port", 11112), "stow": node.get("stow_port", 8043)} if node else {}
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
            "grpc": port,
            "metrics": config["services"][svc]["metrics_port"],
            **intakes,
        }
        assert c["command"] == ["python", "-m", f"cxr_{svc}", "--config", "/etc/cxr/config.json"]
        assert _env(c)["CXR_CONFIG_PATH"] == "/etc/cxr/config.json"


def test_config_map_is_a_valid_service_config(any_render: Rendered, tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(any_render.get("ConfigMap", "cxr-config")["data"]["config.json"])
    settings = load_settings(path, environ={})
    assert {s: settings.endpoint(s).port for s in SERVICES} == {
        "classification": 50051,
        "segmentation": 50052,
        "rag": 50053,
        "dicom": 50055,
    }
    assert settings.security.api_keys == []
    assert str(settings.security.api_key_file).startswith("/etc/cxr/secrets/")


def test_api_keys_come_from_a_secret_file_that_can_rotate(dev_render: Rendered, dev_values: dict) -> None:
    keys = dev_values["apiKeys"]["keys"]
    secret = dev_render.get("Secret", "cxr-api-keys")
    assert base64.b64decode(secret["data"]["api-keys"]).decode().split() == keys
    config = _config(dev_render)
    for svc in SERVICES:
        spec = pod_spec(dev_render.get("Deployment", f"cxr-{svc}"))
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "api-keys")
        volume = next(v for v in spec["volumes"] if v["name"] == "api-keys")
        # a subPath mount never sees an updated Secret: the directory mount is what lets keys rotate
        assert "subPath" not in mount and mount["readOnly"] is True
        item = volume["secret"]["items"][0]
        assert f"{mount['mountPath']}/{item['path']}" == config["security"]["api_key_file"]
        assert volume["secret"]["secretName"] == "cxr-api-keys"


def test_no_plaintext_secret_in_any_config_map(dev_render: Rendered, dev_values: dict) -> None:
    secrets = dev_values["apiKeys"]["keys"]
    for cm in dev_render.kinds("ConfigMap"):
        text = json.dumps(cm.get("data", {}))
        for s in secrets:
            assert s not in text, cm["metadata"]["name"]
    for obj in dev_render.objects:
        if obj["kind"] != "Secret":
            assert not any(s in json.dumps(obj) for s in secrets), f"{obj['kind']}/{obj['metadata']['name']}"
    kong = pod_spec(dev_render.get("Deployment", "cxr-kong"))["initContainers"][0]
    assert _env(kong)["DECK_CXR_API_KEY"] == {"secretKeyRef": {"name": "cxr-api-keys", "key": "gateway-key"}}


def test_every_container_is_locked_down(any_render: Rendered) -> None:
    for obj in any_render.objects:
        if obj["kind"] not in WORKLOAD_KINDS:
            continue
        spec = pod_spec(obj)
        assert spec["securityContext"]["runAsNonRoot"] is True, obj["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False
        for c in _containers(obj):
            sc = c["securityContext"]
            where = f"{obj['metadata']['name']}/{c['name']}"
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["runAsNonRoot"] is True, where


def test_weights_from_pvc_or_init_container(default_render: Rendered) -> None:
    for svc in ("classification", "segmentation"):
        spec = pod_spec(default_render.get("Deployment", f"cxr-{svc}"))
        vol = next(v for v in spec["volumes"] if v["name"] == "weights")
        assert vol["persistentVolumeClaim"] == {"claimName": "cxr-model-weights", "readOnly": True}
    assert default_render.has("PersistentVolumeClaim", "cxr-model-weights")
    r = render({"weights": {"source": "initContainer"}})
    spec = pod_spec(r.get("Deployment", "cxr-classification"))
    init = spec["initContainers"][0]
    assert init["name"] == "fetch-weights" and _env(init)["WEIGHTS_DIR"] == "/mnt/models"
    assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == "weights")
    assert not r.has("PersistentVolumeClaim", "cxr-model-weights")
    assert "initContainers" not in pod_spec(r.get("Deployment", "cxr-rag"))


# ---------------------------------------------------------------- scaling and monitoring


def test_hpa_cpu_and_custom_metric_and_pdb(prod_render: Rendered) -> None:
    hpa = prod_render.get("HorizontalPodAutoscaler", "cxr-classification")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "cxr-classification",
    }
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["target"]["averageUtilization"] == 75
    assert metrics["Pods"]["pods"]["metric"]["name"] == "cxr_queue_depth"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert "replicas" not in prod_render.get("Deployment", "cxr-classification")["spec"]
    pdb = prod_render.get("PodDisruptionBudget", "cxr-classification")
    assert (
        pdb["spec"]["selector"]["matchLabels"]
        == prod_render.get("Deployment", "cxr-classification")["spec"]["selector"]["matchLabels"]
    )


def test_service_monitors_point_at_existing_ports(any_render: Rendered) -> None:
    for sm in any_render.kinds("ServiceMonitor"):
        selector = sm["spec"]["selector"]["matchLabels"]
        targets = [s for s in any_render.kinds("Service") if selector.items() <= s["metadata"]["labels"].items()]
        assert len(targets) == 1, sm["metadata"]["name"]
        ports = {p["name"] for p in targets[0]["spec"]["ports"]}
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= ports, sm["metadata"]["name"]


def test_prometheus_rule_ships_the_checked_alert_file(default_render: Rendered) -> None:
    rule = default_render.get("PrometheusRule", "cxr")
    alerts = yaml.safe_load((ROOT / "deploy" / "monitoring" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]


# ---------------------------------------------------------------- network policies


def _pods_matching(r: Rendered, selector: dict[str, str]) -> set[str]:
    out = set()
    for obj in r.objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            labels = obj["spec"]["template"]["metadata"]["labels"]
            if selector.items() <= labels.items():
                out.add(obj["metadata"]["name"])
    return out


def _policy(r: Rendered, name: str) -> dict[str, Any]:
    np = r.get("NetworkPolicy", name)
    assert np["spec"]["policyTypes"] == ["Ingress"]
    assert _pods_matching(r, np["spec"]["podSelector"]["matchLabels"]) == {name}
    return np


def _peers_by_port(r: Rendered, np: dict[str, Any]) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for rule in np["spec"]["ingress"]:
        for port in rule["ports"]:
            for peer in rule.get("from", [None]):
                if peer is None:
                    out.setdefault(port["port"], []).append("anyone")
                elif "podSelector" in peer and "namespaceSelector" not in peer:
                    out.setdefault(port["port"], []).append(
                        frozenset(_pods_matching(r, peer["podSelector"]["matchLabels"]))
                    )
                else:
                    out.setdefault(port["port"], []).append(("namespace", json.dumps(peer, sort_keys=True)))
    return out


def test_only_the_gateway_reaches_the_services(any_render: Rendered) -> None:
    config = _config(any_render)
    for svc in SERVICES:
        peers = _peers_by_port(any_render, _policy(any_render, f"cxr-{svc}"))
        assert peers[config["services"][svc]["port"]] == [frozenset({"cxr-kong"})], svc
        metrics = peers[config["services"][svc]["metrics_port"]]
        assert len(metrics) == 1 and metrics[0][0] == "namespace" and "monitoring" in metrics[0][1]


def test_only_rag_reaches_vllm_and_chroma(default_render: Rendered) -> None:
    vllm = _peers_by_port(default_render, _policy(default_render, "cxr-vllm"))
    assert set(vllm) == {8000}
    pod_peers = [p for p in vllm[8000] if isinstance(p, frozenset)]
    assert pod_peers == [frozenset({"cxr-rag"})]
    assert all(p[0] == "namespace" and "monitoring" in p[1] for p in vllm[8000] if not isinstance(p, frozenset))
    chroma = _peers_by_port(default_render, _policy(default_render, "cxr-chroma"))
    assert chroma == {8000: [frozenset({"cxr-rag"})]}
    kong = _peers_by_port(default_render, _policy(default_render, "cxr-kong"))
    assert kong[8000] == ["anyone"] and kong[8443] == ["anyone"] and "anyone" not in kong[8100]
    rag = _env(pod_spec(default_render.get("Deployment", "cxr-rag"))["containers"][0])
    assert rag["VECTOR_DB_HOST"] == "cxr-chroma" and rag["CXR_LLM_BASE_URL"] == "http://cxr-vllm:8000/v1"


# ---------------------------------------------------------------- vLLM, Chroma, Kong


def test_vllm_serves_the_configured_model_with_a_long_startup(prod_render: Rendered) -> None:
    dep = prod_render.get("Deployment", "cxr-vllm")
    c = pod_spec(dep)["containers"][0]
    assert "--model=deepseek-ai/DeepSeek-R1-Distill-Llama-70B" in c["args"]
    assert "--served-model-name=deepseek-r1-distill-llama-70b" in c["args"]
    s = c["startupProbe"]
    assert s["httpGet"]["path"] == "/health" and s["periodSeconds"] * s["failureThreshold"] >= 1800
    assert _env(c)["HF_HOME"] == "/models/hf" and _env(c)["HF_HUB_OFFLINE"] == "1"
    vols = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    assert vols["hf-cache"]["persistentVolumeClaim"]["claimName"] == "cxr-hf-cache"
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    rag = _env(pod_spec(prod_render.get("Deployment", "cxr-rag"))["containers"][0])
    assert rag["CXR_LLM_MODEL"] == "deepseek-r1-distill-llama-70b"


def test_chroma_statefulset_and_backup_cronjob(default_render: Rendered) -> None:
    sts = default_render.get("StatefulSet", "cxr-chroma")
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    cron = default_render.get("CronJob", "cxr-chroma-backup")
    spec = pod_spec(cron)
    c = spec["containers"][0]
    assert "--retention-days=30" in c["args"] and cron["spec"]["concurrencyPolicy"] == "Forbid"
    data = next(v for v in spec["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"] == {"claimName": "data-cxr-chroma-0", "readOnly": True}
    term = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert _pods_matching(default_render, term["labelSelector"]["matchLabels"]) == {"cxr-chroma"}
    script = default_render.get("ConfigMap", "cxr-chroma-backup")["data"]["backup.py"]
    assert script == (CHART / "files" / "chroma_backup.py").read_text()


def test_kong_ships_gateway_kong_yml_unchanged_and_renders_every_placeholder(default_render: Rendered) -> None:
    kong_yml = (ROOT / "gateway" / "kong.yml").read_text()
    assert default_render.get("ConfigMap", "cxr-kong")["data"]["kong.yml"] == kong_yml
    spec = pod_spec(default_render.get("Deployment", "cxr-kong"))
    env = _env(spec["initContainers"][0])
    placeholders = set(re.findall(r'\$\{\{\s*env\s+"(DECK_[A-Z0-9_]+)"\s*\}\}', kong_yml))
    assert placeholders and placeholders <= set(env), placeholders - set(env)
    config = _config(default_render)
    for svc in SERVICES:
        assert env[f"DECK_{svc.upper()}_HOST"] == f"cxr-{svc}.cxr.svc"
        assert env[f"DECK_{svc.upper()}_PORT"] == str(config["services"][svc]["port"])
    assert env["DECK_DICOM_STOW_PORT"] == str(config["models"]["dicom"].get("stow_port", 8043))  # STOW-RS
    # every .proto the grpc-gateway plugin loads is mounted where kong.yml says, with its imports
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "protos")["mountPath"]
    items = next(v for v in spec["volumes"] if v["name"] == "protos")["configMap"]["items"]
    mounted = {f"{mount}/{i['path']}" for i in items}
    wanted = set(re.findall(r"proto:\s*(\S+\.proto)", kong_yml))
    assert wanted and wanted <= mounted, wanted - mounted
    # Kong's protoc searches /usr/local/kong/include and the .proto's own directory for imports
    include = "/usr/local/kong/include"
    visible = set(mounted)
    for m in spec["containers"][0]["volumeMounts"]:
        if m["name"] == "protos" and m["mountPath"].startswith(include + "/"):
            visible |= {
                f"{m['mountPath']}/{i['path'][len(m['subPath']) + 1 :]}"
                for i in items
                if i["path"].startswith(m["subPath"] + "/")
            }
    data = default_render.get("ConfigMap", "cxr-kong-protos")["data"]
    for i in items:
        text = data[i["key"]]
        assert text == (ROOT / "protos" / i["path"]).read_text()
        here = f"{mount}/{i['path']}".rsplit("/", 1)[0]
        for imp in re.findall(r'^import "([^"]+)";', text, re.M):
            found = imp.startswith("google/protobuf/") or {f"{include}/{imp}", f"{here}/{imp}"} & visible
            assert found, f"{i['path']} imports {imp}: not on Kong's include path"


# ---------------------------------------------------------------- values: schema, docs, guards


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"classification": {"gpu": {"count": "one"}}}, "/classification/gpu/count"),
        ({"classification": {"replicas": 3}}, "additional properties 'replicas'"),
        ({"unknownTopLevel": True}, "additional properties 'unknownTopLevel'"),
        ({"vllm": {"tensorParallelSize": 0}}, "/vllm/tensorParallelSize"),
        ({"weights": {"source": "s3"}}, "/weights/source"),
        ({"config": {"security": {"api_keys": ["0123456789abcdef0123"]}}}, "/config/security/api_keys"),
        ({"config": {"services": {"rag": {"port": "50053"}}}}, "/config/services/rag/port"),
        ({"kong": {"service": {"type": "Ingress"}}}, "/kong/service/type"),
        ({"chroma": {"backup": {"retentionDays": "30"}}}, "/chroma/backup/retentionDays"),
        ({"apiKeys": {"keys": ["short"]}}, "/apiKeys/keys"),
    ],
)
def test_schema_rejects_bad_values(values: dict, message: str) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
            chart.validate_schema(values)
        with pytest.raises(helm.HelmError):
            chart.render(values, name="cxr", namespace="cxr")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"vllm": {"gpu": {"count": 2}}}, "vllm.gpu.count (2) must be >= vllm.tensorParallelSize (4)"),
        (
            {"classification": {"terminationGracePeriodSeconds": 30}},
            "must exceed config.server_config.shutdown_grace_s",
        ),
        ({"apiKeys": {"existingSecret": ""}}, "authentication is on but no key is configured"),
        ({"config": {"security": {"api_key_file": "/tmp/keys"}}}, "api_key_file must be inside apiKeys.mountPath"),
        (
            {"classification": {"autoscaling": {"targetCPUUtilizationPercentage": 0}}},
            "classification.autoscaling: enable at least one metric",
        ),
    ],
)
def test_template_guards_refuse_inconsistent_values(values: dict, message: str) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(values)


def _leaf_paths(node: Any, prefix: str = "") -> set[str]:
    if isinstance(node, dict) and node:
        out: set[str] = set()
        for k, v in node.items():
            out |= _leaf_paths(v, f"{prefix}.{k}" if prefix else k)
        return out
    return {prefix}


def test_every_value_is_documented_with_param() -> None:
    text = (CHART / "values.yaml").read_text()
    params = set(re.findall(r"^## @param (\S+) \S", text, re.M))
    values = yaml.safe_load(text)
    undocumented = {p for p in _leaf_paths(values) if not any(p == d or p.startswith(d + ".") for d in params)}
    assert not undocumented, sorted(undocumented)
    leaves = _leaf_paths(values)
    stale = {d for d in params if not any(p == d or p.startswith(d + ".") for p in leaves)}
    assert not stale, sorted(stale)


def test_schema_forbids_unknown_keys_at_every_documented_level() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"])
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({})
        for f in sorted(EXAMPLES.glob("*.yaml")):
            chart.validate_schema(load_values(f))


def _service_validator(svc: str):
    """The service's own start-up validation of its `models.*` section (None if it moved)."""
    try:
        if svc == "classification":
            from cxr_classification.config import classifier_configs

            return lambda settings, env: classifier_configs(settings)
        if svc == "segmentation":
            from cxr_segmentation.service import segmentation_config

            return lambda settings, env: segmentation_config(settings)
        from cxr_rag.config import rag_config

        return rag_config
    except ImportError:
        return None


@pytest.mark.parametrize("svc", SERVICES)
def test_each_pod_starts_with_a_config_its_service_accepts(any_render: Rendered, svc: str, tmp_path) -> None:
    """What the pod does at start: the mounted JSON + its container env, validated by the service."""
    validate = _service_validator(svc)
    if validate is None:
        pytest.skip(f"cxr_{svc} config validator not importable")
    path = tmp_path / "config.json"
    path.write_text(any_render.get("ConfigMap", "cxr-config")["data"]["config.json"])
    container = pod_spec(any_render.get("Deployment", f"cxr-{svc}"))["containers"][0]
    env = {k: v for k, v in _env(container).items() if isinstance(v, str)}
    settings = load_settings(path, environ=env)
    validate(settings, env)
    assert settings.server_config.device == env["CXR_DEVICE"]
    if svc == "rag" and "CXR_LLM_BASE_URL" in env:
        cfg = validate(settings, env)
        assert cfg.llm.mode == "openai" and cfg.llm.base_url == env["CXR_LLM_BASE_URL"]
        assert cfg.vector_db_host == env["VECTOR_DB_HOST"]


def test_config_is_production_json_with_value_overrides(default_render: Rendered) -> None:
    production = json.loads((ROOT / "config" / "production.json").read_text())
    expected = json.loads(json.dumps(production))
    expected["server_config"]["shutdown_delay_s"] = 5
    assert _config(default_render) == expected
    # false/0 overrides survive the merge (sprig's mergeOverwrite would drop them)
    r = render({"config": {"security": {"enable_authentication": False}, "performance": {"use_amp": False}}})
    cfg = _config(r)
    assert cfg["security"]["enable_authentication"] is False and cfg["performance"]["use_amp"] is False
    assert cfg["security"]["max_image_size_mb"] == production["security"]["max_image_size_mb"]


def test_a_fourth_catalog_service_is_rendered_from_the_catalog_alone(tmp_path: Path) -> None:
    """docs/adding-a-service.md's chart steps on a copy of the chart: a 4th catalog entry in files/services.json,
    its `config.services.<name>` endpoint and its `<name>:` values block (and the schema regenerated for them)
    give it every object the built-in services get, its address in Kong, and the weights when model_admin."""
    import shutil

    chart = tmp_path / "cxr"
    shutil.copytree(CHART, chart, symlinks=False)  # the links (catalog, config, kong.yml) become real files
    catalog = json.loads((CHART / "files" / "services.json").read_text())
    catalog["services"].append(
        {
            "name": "echo",
            "package": "cxr_echo",
            "binding": "cxr_echo.service:build_binding",
            "grpc_services": ["cxr.echo.v1.EchoService"],
            "port": 50054,
            "metrics_port": 9104,
            "model_admin": True,
            "idempotent": True,
        }
    )
    (chart / "files" / "services.json").unlink()
    (chart / "files" / "services.json").write_text(json.dumps(catalog))
    config = json.loads((chart / "files" / "config.json").read_text())
    config["services"]["echo"] = {"host": "0.0.0.0", "port": 50054, "metrics_port": 9104}
    (chart / "files" / "config.json").unlink()
    (chart / "files" / "config.json").write_text(json.dumps(config))
    values = yaml.safe_load((chart / "values.yaml").read_text())
    values["echo"] = {**values["rag"], "image": {**values["rag"]["image"], "repository": "cxr/echo"}}
    (chart / "values.yaml").write_text(yaml.safe_dump(values))
    schema = json.loads((chart / "values.schema.json").read_text())
    schema["properties"]["echo"] = schema["properties"]["rag"]
    endpoints = schema["properties"]["config"]["properties"]["services"]["properties"]
    endpoints["echo"] = endpoints["rag"]
    (chart / "values.schema.json").write_text(json.dumps(schema))

    r = render(chart_dir=chart)
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"):
        obj = r.get(kind, "cxr-echo")
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    assert r.has("ServiceMonitor", "cxr-echo")
    container = pod_spec(r.get("Deployment", "cxr-echo"))["containers"][0]
    assert container["command"][:3] == ["python", "-m", "cxr_echo"]
    assert container["image"].split("@")[0].rsplit(":", 1)[0].endswith("cxr/echo")
    assert {p["containerPort"] for p in container["ports"]} == {50054, 9104}
    # model_admin: the weights volume is mounted read-only, as for classification
    mount = next(m for m in container["volumeMounts"] if m["name"] == "weights")
    assert mount["readOnly"] is True
    assert "CXR_LLM_BASE_URL" not in _env(container)  # rag's vLLM/Chroma wiring is rag's alone
    # only the gateway reaches it, and Kong is given its address
    peers = _peers_by_port(r, _policy(r, "cxr-echo"))
    assert peers[50054] == [frozenset({"cxr-kong"})]
    kong_env = _env(pod_spec(r.get("Deployment", "cxr-kong"))["initContainers"][0])
    assert kong_env["DECK_ECHO_HOST"] == "cxr-echo.cxr.svc" and kong_env["DECK_ECHO_PORT"] == "50054"
    # without model_admin there is no weights volume
    catalog["services"][-1]["model_admin"] = False
    (chart / "files" / "services.json").write_text(json.dumps(catalog))
    container = pod_spec(render(chart_dir=chart).get("Deployment", "cxr-echo"))["containers"][0]
    assert not any(m["name"] == "weights" for m in container.get("volumeMounts", []))


def test_packaged_chart_carries_the_linked_files_and_renders(tmp_path, default_render: Rendered) -> None:
    """`helm package` resolves the links (kong.yml, protos, config, alerts): the archive stands alone."""
    import tarfile

    archive = helm.package(CHART, destination=str(tmp_path))
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        kong = tar.extractfile("cxr/files/kong.yml")
        assert kong is not None and kong.read().decode() == (ROOT / "gateway" / "kong.yml").read_text()
    assert {"cxr/files/config.json", "cxr/files/alerts.yml", "cxr/values.schema.json"} <= names
    assert not any("/examples/" in n for n in names)
    with helm.Chart.load_archive(Path(archive).read_bytes()) as chart:
        manifests = chart.render({}, name="cxr", namespace="cxr")
    objects = [d for p, t in manifests.items() if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]
    assert len(objects) == len(default_render.objects)


def test_external_gateway_peers_replace_kong(tmp_path) -> None:
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}
    r = render({"kong": {"enabled": False}, "networkPolicy": {"extraGatewayPeers": [peer]}})
    assert not r.has("Deployment", "cxr-kong")
    grpc_rule = r.get("NetworkPolicy", "cxr-classification")["spec"]["ingress"][0]
    assert grpc_rule["from"] == [peer]
    with pytest.raises(helm.HelmError, match="leaves no gateway allowed"):
        render({"kong": {"enabled": False}})


@pytest.mark.parametrize("which", ["chart", "compose"])
def test_kong_config_rendered_with_the_deployment_env_validates(
    which: str, dev_render: Rendered, dev_values: dict
) -> None:
    """What `deck file render` produces from the chart's (or compose's) DECK_* variables is a
    valid Kong config (checked with the gateway's typed model of Kong's schema), with the
    backends where the deployment put them."""
    kong_model = pytest.importorskip("cxr_gateway.kong_model")
    kong_yml = (ROOT / "gateway" / "kong.yml").read_text()
    backends = (*SERVICES, "dicom")  # the DICOM node's gRPC API is routed like the others
    if which == "chart":
        env = {k: v for k, v in _env(pod_spec(dev_render.get("Deployment", "cxr-kong"))["initContainers"][0]).items()}
        hosts = {svc: f"cxr-{svc}.cxr.svc" for svc in backends}
    else:
        compose = yaml.safe_load((ROOT / "deploy" / "docker" / "compose.yaml").read_text())
        env = dict(compose["services"]["kong-config"]["environment"])
        env["DECK_OTEL_TRACES_ENDPOINT"] = "http://otel-collector:4318/v1/traces"  # the ${VAR:-default}
        hosts = {svc: svc for svc in backends}
    env["DECK_CXR_API_KEY"] = dev_values["apiKeys"]["keys"][0]  # from the Secret at run time
    env["DECK_CXR_ADMIN_API_KEY"] = dev_values["adminApiKeys"]["keys"][0]  # from the admin Secret
    config = kong_model.parse(kong_yml, env)
    targets = {t.target for u in config.upstreams for t in u.targets}
    ports = json.loads((ROOT / "config" / "production.json").read_text())["services"]
    assert targets == {f"{hosts[s]}:{ports[s]['port']}" for s in backends}
    keys = {c.username: [k.key for k in c.keyauth_credentials] for c in config.consumers}
    assert keys["cxr-client"] == [env["DECK_CXR_API_KEY"]]
    # the admin consumer (where kong.yml has the admin group) takes its key from the admin Secret
    assert set(keys) <= {"cxr-client", "cxr-admin"}
    assert keys.get("cxr-admin", [env["DECK_CXR_ADMIN_API_KEY"]]) == [env["DECK_CXR_ADMIN_API_KEY"]]


@pytest.mark.parametrize("generator", ["gen_chart_readme.py", "gen_chart_schema.py"])
def test_generated_chart_files_are_current(generator: str) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / generator), "--check"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


def test_chart_readme_lists_the_parameters() -> None:
    readme = (CHART / "README.md").read_text()
    assert "| `vllm.tensorParallelSize` |" in readme and "| `chroma.backup.retentionDays` |" in readme
