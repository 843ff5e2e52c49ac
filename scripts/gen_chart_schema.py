"""Generate deploy/helm/cxr/values.schema.json (JSON Schema draft-07, what Helm validates
values against), or check it is current. Edit the schema here, not in the JSON.

Every object is closed (`additionalProperties: false`) except free-form Kubernetes fragments
(affinity, securityContext, ...) and the per-model config sections, which the services
validate themselves at start.

    python scripts/gen_chart_schema.py          # rewrite values.schema.json
    python scripts/gen_chart_schema.py --check  # exit 1 when it is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cxr_serving.catalog import load_catalog

# One values block and one `config.services` endpoint per service of the catalog (the chart reads the same file).
SERVICE_NAMES = list(load_catalog())
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "cxr" / "values.schema.json"


def obj(
    props: dict[str, Any], required: list[str] | None = None, desc: str | None = None, extra: bool = False
) -> dict[str, Any]:
    o: dict[str, Any] = {"type": "object", "additionalProperties": extra, "properties": props}
    if required:
        o["required"] = required
    if desc:
        o["description"] = desc
    return o


S = {"type": "string"}
B = {"type": "boolean"}
I0 = {"type": "integer", "minimum": 0}
I1 = {"type": "integer", "minimum": 1}
FREE = {"type": "object"}
STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
QTY = {
    "oneOf": [
        {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"},
        {"type": "number", "minimum": 0},
    ]
}
SIZE = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"}
DURATION = {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"}

defs: dict[str, Any] = {}
defs["image"] = obj(
    {
        "registry": S,
        "repository": {"type": "string", "minLength": 1},
        "tag": S,
        "digest": {"type": "string", "pattern": r"^(|sha256:[a-f0-9]{64})$"},
        "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    },
    ["repository"],
)
defs["resources"] = obj(
    {
        "requests": {"type": "object", "additionalProperties": QTY},
        "limits": {"type": "object", "additionalProperties": QTY},
    },
    desc="CPU/memory; the GPU limit comes from `gpu`",
)
defs["gpu"] = obj({"count": I0, "resourceName": {"type": "string", "minLength": 1}}, ["count", "resourceName"])
probe = obj({"periodSeconds": I1, "failureThreshold": I1}, ["periodSeconds", "failureThreshold"])
defs["probe"] = probe
defs["probes"] = obj(
    {
        "startup": {"$ref": "#/definitions/probe"},
        "readiness": {"$ref": "#/definitions/probe"},
        "liveness": {"$ref": "#/definitions/probe"},
    }
)
defs["tolerations"] = {
    "type": "array",
    "items": obj(
        {
            "key": S,
            "operator": {"enum": ["Equal", "Exists"]},
            "value": S,
            "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute", ""]},
            "tolerationSeconds": {"type": "integer"},
        }
    ),
}
defs["envList"] = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": S, "value": S, "valueFrom": FREE},
        "additionalProperties": False,
    },
}
defs["service"] = obj({"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "annotations": STRMAP})
defs["pdb"] = obj(
    {"enabled": B, "maxUnavailable": {"oneOf": [I1, {"type": "string", "pattern": r"^[0-9]+%$"}]}}, ["enabled"]
)
defs["serviceMonitor"] = obj(
    {"enabled": B, "interval": DURATION, "scrapeTimeout": DURATION, "labels": STRMAP}, ["enabled"]
)
defs["networkPolicy"] = obj({"enabled": B}, ["enabled"])
defs["autoscaling"] = obj(
    {
        "enabled": B,
        "minReplicas": I1,
        "maxReplicas": I1,
        "targetCPUUtilizationPercentage": {"type": "integer", "minimum": 0, "maximum": 100},
        "customMetric": obj(
            {
                "enabled": B,
                "name": {"type": "string", "minLength": 1},
                "targetAverageValue": {"type": "string", "minLength": 1},
            }
        ),
    },
    ["enabled"],
)
defs["podSecurityContext"] = FREE
defs["containerSecurityContext"] = FREE


def ref(n: str) -> dict[str, str]:
    return {"$ref": f"#/definitions/{n}"}


common = {
    "enabled": B,
    "image": ref("image"),
    "resources": ref("resources"),
    "nodeSelector": STRMAP,
    "tolerations": ref("tolerations"),
    "affinity": FREE,
    "topologySpreadConstraints": {"type": "array", "items": FREE},
    "priorityClassName": S,
    "podAnnotations": STRMAP,
    "podLabels": STRMAP,
    "probes": ref("probes"),
}


def svc_block() -> dict[str, Any]:
    return obj(
        {
            **common,
            "replicaCount": I0,
            "device": {"type": "string", "pattern": r"^(|cpu|cuda|auto|cuda:[0-9]+)$"},
            "gpu": ref("gpu"),
            "terminationGracePeriodSeconds": I1,
            "extraEnv": ref("envList"),
            "service": ref("service"),
            "autoscaling": ref("autoscaling"),
            "pdb": ref("pdb"),
            "serviceMonitor": ref("serviceMonitor"),
            "networkPolicy": ref("networkPolicy"),
        },
        ["enabled", "image", "gpu", "resources", "probes"],
    )


defs["serviceBlock"] = svc_block()
_dicom = svc_block()
_dicom["properties"] |= {
    "persistence": obj(
        {
            "existingClaim": S,
            "size": SIZE,
            "storageClass": S,
            "accessModes": {
                "type": "array",
                "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]},
                "minItems": 1,
            },
        },
        ["existingClaim", "size", "accessModes"],
    ),
    "dimse": obj(
        {
            "service": obj(
                {
                    "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                    "nodePort": {"type": "integer", "minimum": 0, "maximum": 65535},
                    "loadBalancerSourceRanges": {"type": "array", "items": {"type": "string", "minLength": 1}},
                    "externalTrafficPolicy": {"enum": ["", "Cluster", "Local"]},
                    "annotations": STRMAP,
                },
                ["type"],
            ),
            "allowedFrom": {"type": "array", "items": FREE},
        },
        ["service"],
    ),
}
_dicom["required"] = [*_dicom["required"], "persistence", "dimse"]
defs["dicomBlock"] = _dicom  # the DICOM node: a service block plus its queue volume and DIMSE Service

vllm = obj(
    {
        **common,
        "replicaCount": I0,
        "model": {"type": "string", "minLength": 1},
        "servedModelName": S,
        "tensorParallelSize": I1,
        "maxModelLen": I0,
        "gpuMemoryUtilization": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "extraArgs": {"type": "array", "items": S},
        "offline": B,
        "port": PORT,
        "gpu": ref("gpu"),
        "shmSize": SIZE,
        "hfCache": obj(
            {
                "existingClaim": S,
                "size": SIZE,
                "storageClass": S,
                "accessModes": {
                    "type": "array",
                    "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]},
                    "minItems": 1,
                },
                "mountPath": {"type": "string", "pattern": "^/"},
            }
        ),
        "terminationGracePeriodSeconds": I1,
        "extraEnv": ref("envList"),
        "podSecurityContext": ref("podSecurityContext"),
        "containerSecurityContext": ref("containerSecurityContext"),
        "service": ref("service"),
        "pdb": ref("pdb"),
        "serviceMonitor": ref("serviceMonitor"),
        "networkPolicy": ref("networkPolicy"),
    },
    ["enabled", "model", "tensorParallelSize", "gpu"],
)

chroma = obj(
    {
        **common,
        "port": PORT,
        "persistence": obj({"size": SIZE, "storageClass": S, "mountPath": {"type": "string", "pattern": "^/"}}),
        "extraEnv": ref("envList"),
        "podSecurityContext": ref("podSecurityContext"),
        "containerSecurityContext": ref("containerSecurityContext"),
        "service": obj({"annotations": STRMAP}),
        "networkPolicy": ref("networkPolicy"),
        "backup": obj(
            {
                "enabled": B,
                "schedule": {"type": "string", "pattern": r"^(@(hourly|daily|weekly|monthly)|(\S+\s+){4}\S+)$"},
                "retentionDays": I1,
                "image": ref("image"),
                "persistence": obj({"existingClaim": S, "size": SIZE, "storageClass": S}),
                "resources": ref("resources"),
            }
        ),
    }
)
for k in ("topologySpreadConstraints",):
    chroma["properties"].pop(k)

kong = obj(
    {
        **common,
        "replicaCount": I0,
        "declarativeConfig": S,
        "env": STRMAP,
        "otelTracesEndpoint": {"type": "string", "pattern": "^https?://"},
        "deck": obj({"image": ref("image")}),
        "terminationGracePeriodSeconds": I1,
        "podSecurityContext": ref("podSecurityContext"),
        "containerSecurityContext": ref("containerSecurityContext"),
        "service": obj(
            {
                "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "annotations": STRMAP,
                "httpPort": PORT,
                "httpsPort": PORT,
            }
        ),
        "autoscaling": obj(
            {
                "enabled": B,
                "minReplicas": I1,
                "maxReplicas": I1,
                "targetCPUUtilizationPercentage": {"type": "integer", "minimum": 0, "maximum": 100},
            }
        ),
        "pdb": ref("pdb"),
        "serviceMonitor": ref("serviceMonitor"),
        "networkPolicy": ref("networkPolicy"),
    }
)
kong["properties"]["probes"] = obj({"readiness": ref("probe"), "liveness": ref("probe")})

endpoint = obj({"host": S, "port": PORT, "metrics_port": PORT})
config = obj(
    {
        "environment": S,
        "models_path": S,
        "data_path": S,
        "models": {
            "type": "object",
            "additionalProperties": {"type": "object"},
            "description": "per-model sections, validated by each service at start",
        },
        "server_config": {
            "type": "object",
            "description": "cxr_serving ServerConfig (validated at start)",
            "properties": {
                "device": S,
                "max_batch_size": I1,
                "shutdown_grace_s": {"type": "number", "minimum": 0},
                "shutdown_delay_s": {"type": "number", "minimum": 0},
                "log_level": {"enum": ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]},
            },
        },
        "performance": {"type": "object"},
        "security": {
            "type": "object",
            "properties": {
                "enable_authentication": B,
                "api_keys": {
                    "type": "array",
                    "maxItems": 0,
                    "description": "must stay empty: keys belong in apiKeys (a Secret)",
                },
                "api_key_file": {"type": "string", "pattern": "^/"},
                "admin_api_keys": {
                    "type": "array",
                    "maxItems": 0,
                    "description": "must stay empty: admin keys belong in adminApiKeys (a Secret of their own)",
                },
            },
        },
        "monitoring": {"type": "object"},
        "services": obj(dict.fromkeys(SERVICE_NAMES, endpoint)),
    },
    desc="overrides of config/production.json (same shape)",
)

SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "cxr chart values",
    "type": "object",
    "additionalProperties": False,
    "definitions": defs,
    "properties": {
        "global": obj({"imageRegistry": S, "imagePullSecrets": {"type": "array", "items": S}, "storageClass": S}),
        "nameOverride": S,
        "fullnameOverride": S,
        "commonLabels": STRMAP,
        "commonAnnotations": STRMAP,
        "config": config,
        "apiKeys": obj(
            {
                "existingSecret": S,
                "secretKey": {"type": "string", "minLength": 1},
                "gatewayKeySecretKey": {"type": "string", "minLength": 1},
                "keys": {"type": "array", "items": {"type": "string", "minLength": 16}},
                "mountPath": {"type": "string", "pattern": "^/"},
            }
        ),
        "adminApiKeys": obj(
            {
                "existingSecret": S,
                "secretKey": {"type": "string", "minLength": 1},
                "gatewayKeySecretKey": {"type": "string", "minLength": 1},
                "keys": {"type": "array", "items": {"type": "string", "minLength": 16}},
                "mountPath": {"type": "string", "pattern": "^/"},
            },
            desc="admin keys (LoadModel, UnloadModel, IngestDocuments), in a Secret apart from apiKeys",
        ),
        "backendTls": obj(
            {
                "enabled": B,
                "secretName": {"type": "string", "minLength": 1},
                "mountPath": {"type": "string", "pattern": "^/"},
                "mutual": B,
            },
            required=["enabled", "secretName", "mountPath", "mutual"],
        ),
        "weights": obj(
            {
                "source": {"enum": ["pvc", "initContainer", "none"]},
                "mountPath": {"type": "string", "pattern": "^/"},
                "pvc": obj(
                    {
                        "existingClaim": S,
                        "size": SIZE,
                        "storageClass": S,
                        "accessModes": {
                            "type": "array",
                            "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]},
                            "minItems": 1,
                        },
                    }
                ),
                "initContainer": obj(
                    {
                        "image": ref("image"),
                        "command": {"type": "array", "items": S, "minItems": 1},
                        "env": ref("envList"),
                        "sizeLimit": SIZE,
                    }
                ),
            },
            ["source"],
        ),
        "serviceDefaults": obj(
            {
                "podSecurityContext": ref("podSecurityContext"),
                "containerSecurityContext": ref("containerSecurityContext"),
            }
        ),
        **{name: ref("dicomBlock" if name == "dicom" else "serviceBlock") for name in SERVICE_NAMES},
        "vllm": vllm,
        "chroma": chroma,
        "kong": kong,
        "evaluate": obj(
            {
                "enabled": B,
                "image": ref("image"),
                "service": {"enum": ["classification", "segmentation"]},
                "model": {"type": "string", "pattern": r"^([A-Za-z0-9_.-]+(@[A-Za-z0-9_.-]+)?)?$"},
                "labels": S,
                "images": S,
                "recordCard": B,
                "extraArgs": {"type": "array", "items": S},
                "timeoutSeconds": {"type": "number", "exclusiveMinimum": 0},
                "dataset": obj({"existingClaim": S, "hostPath": S, "mountPath": {"type": "string", "pattern": "^/"}}),
                "results": obj({"existingClaim": S}),
                "backoffLimit": I0,
                "activeDeadlineSeconds": I1,
                "ttlSecondsAfterFinished": I0,
                "resources": ref("resources"),
                "nodeSelector": STRMAP,
                "tolerations": ref("tolerations"),
            },
            desc="a Job running `cxr evaluate` against the chart's classification or segmentation Service",
        ),
        "networkPolicy": obj(
            {
                "monitoringNamespaceSelector": obj(
                    {"matchLabels": STRMAP, "matchExpressions": {"type": "array", "items": FREE}},
                    desc="label selector of the monitoring namespaces; the chart refuses an empty one",
                ),
                "monitoringPodSelector": FREE,
                "extraGatewayPeers": {"type": "array", "items": FREE},
            }
        ),
        "prometheusRule": obj({"enabled": B, "labels": STRMAP}),
    },
}


def render() -> str:
    return json.dumps(SCHEMA, indent=2) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    fresh = render()
    if args.check:
        if SCHEMA_PATH.read_text() != fresh:
            print(f"{SCHEMA_PATH} is stale: run python scripts/gen_chart_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
