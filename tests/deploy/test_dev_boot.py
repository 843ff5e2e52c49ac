"""The CPU-only overlay boots the real services: each pod's rendered config and environment
(with the Secret's key file and free ports in place of the mounts) starts the service process,
and the image's health check (what the kubelet's gRPC probe asks) turns SERVING."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from tests.support.chart import ROOT, Rendered, pod_spec
from tests.support.docker import DOCKER, healthcheck_code, instructions
from tests.support.servers import free_port

HEALTH = healthcheck_code(next(a for k, a in instructions(DOCKER / "classification.Dockerfile") if k == "HEALTHCHECK"))


@pytest.mark.slow
@pytest.mark.parametrize("svc", ["classification"])  # segmentation boots the same way (~40 s here): kept out for time
def test_dev_overlay_pod_boots_and_turns_serving(dev_render: Rendered, svc: str, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(dev_render.get("ConfigMap", "cxr-config")["data"]["config.json"])
    keys = tmp_path / "api-keys"
    keys.write_bytes(base64.b64decode(dev_render.get("Secret", "cxr-api-keys")["data"]["api-keys"]))
    container = pod_spec(dev_render.get("Deployment", f"cxr-{svc}"))["containers"][0]
    pod_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    port, metrics = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CXR_")},
        **pod_env,
        "HOME": str(tmp_path),
        "XDG_CACHE_HOME": str(tmp_path / ".cache"),
        "CXR_CONFIG_PATH": str(config),
        "CXR_SECURITY__API_KEY_FILE": str(keys),
        f"CXR_SERVICES__{svc.upper()}__HOST": "127.0.0.1",
        f"CXR_SERVICES__{svc.upper()}__PORT": str(port),
        f"CXR_SERVICES__{svc.upper()}__METRICS_PORT": str(metrics),
    }
    cmd = [sys.executable, *container["command"][1:3], "--config", str(config)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, healthy = time.monotonic() + 150, False
        while time.monotonic() < deadline and proc.poll() is None and not healthy:
            check = subprocess.run(
                [sys.executable, "-c", HEALTH],
                env={**os.environ, "CXR_HEALTH_ADDR": f"127.0.0.1:{port}"},
                capture_output=True,
                timeout=30,
            )
            healthy = check.returncode == 0
            if not healthy:
                time.sleep(1)
        assert healthy, f"not SERVING: exit={proc.poll()} {proc.stderr.read().decode()[-2000:] if proc.poll() else ''}"
        # the Secret's key opens the API; the models say they are untrained
        key = keys.read_text().split()[0]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            if svc == "classification":
                from cxr_protos.classification.v1 import classification_service_pb2 as pb
                from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc

                stub = pb_grpc.ClassificationServiceStub(ch)
            else:
                from cxr_protos.segmentation.v1 import segmentation_service_pb2 as pb  # type: ignore[no-redef]
                from cxr_protos.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc  # type: ignore[no-redef]

                stub = pb_grpc.SegmentationServiceStub(ch)
            models = stub.ListModels(pb.ListModelsRequest(), metadata=(("x-api-key", key),), timeout=30)
            assert models.models and all(m.version == "untrained" for m in models.models), models
            with pytest.raises(grpc.RpcError) as denied:
                stub.ListModels(pb.ListModelsRequest(), timeout=30)
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert json.loads(config.read_text())["server_config"]["device"] == "cpu"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
