"""The service catalog: one validated list of services, read by settings, the client and the generated files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cxr_client.config import ClientConfig
from cxr_client.retry_policy import SERVICE_NAMES
from cxr_serving import heap
from cxr_serving.catalog import RESERVED_NAMES, load_catalog
from cxr_serving.cli import main as serving_main
from cxr_serving.errors import ConfigError
from cxr_serving.settings import load_settings
from tests.support.catalogs import ECHO_ENTRY as ENTRY
from tests.support.paths import REPO
from tests.support.scripts import load_script

gen_catalog = load_script("gen_catalog")


def write(tmp_path: Path, *entries: dict, name: str = "extra.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps({"services": list(entries)}))
    return p


def test_builtin_catalog_is_the_platform() -> None:
    cat = load_catalog()
    assert [(s.name, s.port, s.metrics_port, s.model_admin) for s in cat.values()] == [
        ("classification", 50051, 9101, True),
        ("segmentation", 50052, 9102, True),
        ("rag", 50053, 9103, False),
        ("dicom", 50055, 9105, False),
    ]
    assert cat["rag"].grpc_services == ("cxr.rag.v1.RagService",)
    assert all(s.idempotent for s in cat.values())  # every platform RPC may be replayed (retry policy)
    # every binding of the platform imports and is what `python -m cxr_serving <name>` runs
    for spec in cat.values():
        assert callable(spec.load_binding())
    # the client's retry policy covers exactly the catalog's gRPC services (and health)
    assert set(SERVICE_NAMES) == {g for s in cat.values() for g in s.grpc_services} | {"grpc.health.v1.Health"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "rag"}, "rag.name is already used by service 'rag'"),
        ({"port": 50052}, "port is already used by service 'segmentation'"),
        ({"metrics_port": 50053}, "metrics_port is already used by service 'rag'"),
        ({"grpc_services": ["cxr.rag.v1.RagService"]}, "grpc_services is already used by service 'rag'"),
        ({"port": 9160}, "port and metrics_port are both 9160"),
        ({"port": 70000}, r"services\[0\].port: 70000 is not a port"),
        ({"port": "50060"}, r"services\[0\].port: must be a int"),
        ({"model_admin": 1}, r"model_admin: must be a bool"),
        ({"idempotent": "yes"}, r"idempotent: must be a bool"),
        ({"name": "Echo-Svc"}, "must be lower-case letters"),
        # `cxr-chest_ct` is not a valid Kubernetes object name, nor is a name past 63 characters
        ({"name": "chest_ct"}, r"services\[0\].name: 'chest_ct' must be lower-case letters and digits"),
        ({"name": "chest-ct"}, "must be lower-case letters and digits"),
        ({"name": "2d"}, "starting with a letter"),
        ({"name": "a" * 32}, "at most 31 characters"),
        # the chart reads `.Values.<name>`: these would read another component's block
        ({"name": "kong"}, r"services\[0\].name: 'kong' is reserved"),
        ({"name": "vllm"}, "'vllm' is reserved"),
        ({"name": "global"}, "'global' is reserved"),
        ({"name": "weights"}, "'weights' is reserved"),
        ({"binding": "json.loads"}, "must be 'package.module:function'"),
        ({"grpc_services": []}, "must list full service names"),
        ({"colour": "blue"}, r"unknown keys \['colour'\]"),
    ],
)
def test_bad_catalog_entries_are_refused_naming_file_and_field(tmp_path: Path, change: dict, message: str) -> None:
    path = write(tmp_path, {**ENTRY, **change})
    with pytest.raises(ConfigError, match=message) as err:
        load_catalog([path])
    assert str(path) in str(err.value)
    # the same error stops a service at start: the setting is read, not ignored
    with pytest.raises(ConfigError, match=message):
        load_settings(None, environ={"CXR_SERVICE_CATALOG": str(path)})


def test_reserved_names_are_the_charts_other_values_keys(tmp_path: Path) -> None:
    """Every top-level key of the chart's values that is not a catalog service is a reserved name, so a
    key added to values.yaml without reserving it here fails this test."""
    values = yaml.safe_load((REPO / "deploy/helm/cxr/values.yaml").read_text())
    assert RESERVED_NAMES == set(values) - set(load_catalog())
    assert set(load_catalog()) <= set(values)
    # the longest name allowed still leaves a release prefix room within a 63-character object name
    assert load_catalog([write(tmp_path, {**ENTRY, "name": "a" * 31})])["a" * 31]


def test_missing_keys_unreadable_and_non_json_files(tmp_path: Path) -> None:
    entry = {k: v for k, v in ENTRY.items() if k != "port"}
    with pytest.raises(ConfigError, match=r"missing keys \['port'\]"):
        load_catalog([write(tmp_path, entry)])
    with pytest.raises(ConfigError, match="cannot read"):
        load_catalog([tmp_path / "nope.json"])
    bad = tmp_path / "bad.json"
    bad.write_text("{services: []}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_catalog([bad])
    with pytest.raises(ConfigError, match="one key, 'services'"):
        load_catalog([_doc(tmp_path, {"service": []})])


def _doc(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "doc.json"
    p.write_text(json.dumps(data))
    return p


def test_extra_files_and_settings(tmp_path: Path) -> None:
    a = write(tmp_path, ENTRY, name="a.json")
    echo2 = {"name": "echo2", "port": 50061, "metrics_port": 9161, "grpc_services": ["cxr.echo.v2.EchoService"]}
    b = write(tmp_path, {**ENTRY, **echo2}, name="b.json")
    env = {"CXR_SERVICE_CATALOG": os.pathsep.join([str(a), str(b)]), "CXR_SERVICES__ECHO__PORT": "0"}
    s = load_settings(None, environ=env)
    assert list(s.catalog())[-2:] == ["echo", "echo2"]
    # a partial override keeps the catalog's other default; the config file form works the same
    assert (s.endpoint("echo").port, s.endpoint("echo").metrics_port) == (0, 9160)
    assert s.endpoint("echo2").port == 50061
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"service_catalog": [str(a)], "services": {"rag": {"port": 1, "metrics_port": 2}}}))
    s = load_settings(cfg, environ={})
    assert s.endpoint("echo").port == 50060 and s.endpoint("rag").port == 1 and s.endpoint("segmentation").port == 50052
    with pytest.raises(ConfigError, match="unknown service 'nope'"):
        s.catalog()["nope"]
    # the client: endpoints by name, CXR_<NAME>_ENDPOINT for an extra service, a name defined twice refused
    c = ClientConfig.from_env({"CXR_SERVICE_CATALOG": str(a), "CXR_ECHO_ENDPOINT": "h:1"})
    assert c.endpoint_for("echo") == "h:1" and c.endpoint_for("rag") == "127.0.0.1:50053"
    with pytest.raises(ValueError, match="already defined"):
        ClientConfig.from_env({"CXR_SERVICE_CATALOG": os.pathsep.join([str(a), str(a)])})


def test_unknown_service_fails_at_start(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for key in [k for k in os.environ if k.startswith("CXR_")]:
        monkeypatch.delenv(key)
    monkeypatch.setattr(heap, "_service_process", False)
    assert serving_main(["nosuch", "--port", "0", "--metrics-port", "0"]) == 2
    assert "unknown service 'nosuch'" in capsys.readouterr().err
    assert serving_main([]) == 2
    # a start refused (here in the test's own process) does not mark the process as a service's: its heap stays
    # collectable, and a DICOM node a later test hosts here does not freeze it
    assert not heap._service_process and not heap.freeze_startup_heap()


def test_generated_files_are_current_and_stale_ones_are_caught(tmp_path: Path) -> None:
    script = REPO / "scripts" / "gen_catalog.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    client, alerts = tmp_path / "services.json", tmp_path / "alerts.yml"
    shutil.copy(gen_catalog.CLIENT_COPY, client)
    shutil.copy(gen_catalog.ALERTS, alerts)
    cat = load_catalog()
    assert gen_catalog.stale(cat, client, alerts) == {}
    # one more service in the catalog: both generated files are stale, and what they should hold names it
    bigger = load_catalog([write(tmp_path, ENTRY)])
    fresh = gen_catalog.stale(bigger, client, alerts)
    assert set(fresh) == {client, alerts}
    assert '".*(classification|segmentation|rag|dicom|echo).*"' in fresh[alerts]
    assert [s["name"] for s in json.loads(fresh[client])["services"]][-1] == "echo"
