"""Every settings key has an effect, or is refused at start with the reason (issue: no setting
accepted and then ignored)."""

from __future__ import annotations

import ast
import json
import re
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from cxr_serving.errors import ConfigError
from cxr_serving.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = [REPO / "libs", REPO / "services", REPO / "gateway"]
SETTINGS_PY = REPO / "libs/serving/src/cxr_serving/settings.py"


def _models_in(annotation: typing.Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def settings_keys(model: type[BaseModel] = Settings, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted path, field name) of every field of every nested model, recursively."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path, name
        for sub in _models_in(field.annotation):
            yield from settings_keys(sub, f"{path}.")


def _source_text() -> str:
    files = [
        p
        for d in SOURCE_DIRS
        for p in d.rglob("*.py")
        if p != SETTINGS_PY and "_pb2" not in p.name and "/tests/" not in str(p)
    ]
    assert len(files) > 50, "source tree not found"
    return "\n".join(p.read_text(encoding="utf-8") for p in files)


def _read_through_methods(source: str) -> set[str]:
    """Fields read by a settings method (`self.<field>`) that code outside settings.py calls."""
    read: set[str] = set()
    for node in ast.walk(ast.parse(SETTINGS_PY.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef) and re.search(rf"\.{node.name}\(", source):
            read |= {
                n.attr
                for n in ast.walk(node)
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
            }
    return read


def test_every_settings_key_is_read_by_some_code() -> None:
    source = _source_text()
    via_methods = _read_through_methods(source)
    keys = list(settings_keys())
    assert len(keys) > 60 and ("security.tls.cert_file", "cert_file") in keys  # the walk reached nested models
    unread = [
        path
        for path, name in keys
        if name not in via_methods and not re.search(rf"\.{name}\b|[\"']{name}[\"']", source)
    ]
    assert unread == [], f"settings keys no code reads (give each an effect or refuse it in settings.py): {unread}"


@pytest.mark.parametrize(
    ("section", "key", "harmless", "refused", "why"),
    [
        ("server_config", "cache_models", True, False, "stays loaded"),
        ("performance", "optimize_memory", True, False, "handed back"),
        ("monitoring", "enable_timing", True, False, "always measured"),
        ("monitoring", "metrics_file", None, "/var/log/cxr-agent/metrics.json", "Prometheus endpoint"),
    ],
)
def test_seed_keys_without_use_accept_only_their_harmless_value(section, key, harmless, refused, why) -> None:
    accepted = Settings.model_validate({section: {key: harmless}})
    assert key not in accepted.model_dump()[section]  # dropped: nothing pretends to act on it
    with pytest.raises(ConfigError) as err:
        load_settings(None, environ={f"CXR_{section.upper()}__{key.upper()}": str(refused).lower()})
    assert f"{section}.{key} is not supported" in str(err.value) and why in str(err.value)


def test_service_side_rate_limiting_is_refused_as_the_gateways_job() -> None:
    for value in ({"enabled": True, "requests_per_minute": 100}, {"enabled": False}, {}):
        with pytest.raises(
            ConfigError, match=r"security\.rate_limiting is not supported: rate limiting is the gateway"
        ):
            load_settings(None, environ={"CXR_SECURITY__RATE_LIMITING": json.dumps(value)})


def test_allowed_ips_and_trusted_proxies_are_cidr_blocks_checked_at_start() -> None:
    s = load_settings(
        None, environ={"CXR_ALLOWED_IPS": "10.0.0.0/8, 127.0.0.1,::1", "CXR_SECURITY__TRUSTED_PROXIES": "10.1.2.3/16"}
    )
    assert s.security.allowed_ips == ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]
    assert s.security.trusted_proxies == ["10.1.0.0/16"]
    for env in ({"CXR_ALLOWED_IPS": "10.0.0.0/8,10.0.0.300"}, {"CXR_SECURITY__TRUSTED_PROXIES": "gateway"}):
        with pytest.raises(ConfigError) as err:
            load_settings(None, environ=env)
        field = "allowed_ips" if "CXR_ALLOWED_IPS" in env else "trusted_proxies"
        assert f"security.{field}:" in str(err.value) and "is not an IP address or CIDR block" in str(err.value)


def test_admin_keys_from_settings_and_environment(tmp_path: Path) -> None:
    key_file = tmp_path / "admin-keys"
    s = load_settings(None, environ={"CXR_ADMIN_API_KEY": "a1, a2", "CXR_ADMIN_API_KEY_FILE": str(key_file)})
    assert s.security.admin_api_keys == ["a1", "a2"] and s.security.admin_api_key_file == key_file
    assert Settings.model_validate({"security": {"admin_api_keys": ["x"]}}).security.admin_api_keys == ["x"]


def test_admin_keys_are_refused_when_authentication_is_off(tmp_path: Path) -> None:
    """With authentication off no key is checked, so admin keys would be accepted and ignored."""
    off = {"CXR_SECURITY__ENABLE_AUTHENTICATION": "false"}
    for admin in ({"CXR_ADMIN_API_KEY": "a1"}, {"CXR_ADMIN_API_KEY_FILE": str(tmp_path / "admin-keys")}):
        with pytest.raises(ConfigError, match=r"security: .*enable_authentication is false") as err:
            load_settings(None, environ={**off, **admin})
        assert "admin RPCs are refused" in str(err.value)
        assert load_settings(None, environ=admin).security.enable_authentication is True
    assert load_settings(None, environ=off).security.enable_authentication is False


def test_no_admin_rpc_can_be_an_unauthenticated_method() -> None:
    from cxr_serving.roles import platform_admin_methods

    health = ["/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"]
    admin = sorted(platform_admin_methods())
    assert len(admin) == 5 and "/cxr.rag.v1.RagService/IngestDocuments" in admin
    for method in admin:
        env = {"CXR_SECURITY__UNAUTHENTICATED_METHODS": json.dumps([*health, method])}
        with pytest.raises(ConfigError, match="unauthenticated_methods lists admin RPCs") as err:
            load_settings(None, environ=env)
        assert method in str(err.value)
    env = {"CXR_SECURITY__UNAUTHENTICATED_METHODS": json.dumps([*health, "/cxr.rag.v1.RagService/SearchLiterature"])}
    assert load_settings(None, environ=env).security.unauthenticated_methods[-1].endswith("/SearchLiterature")


def test_trusted_proxies_without_allowed_ips_is_refused() -> None:
    """X-Forwarded-For is read only to check allowed_ips: trusted proxies alone would be ignored."""
    with pytest.raises(ConfigError, match="trusted_proxies is set without allowed_ips"):
        load_settings(None, environ={"CXR_SECURITY__TRUSTED_PROXIES": "10.1.0.0/16"})
    env = {"CXR_SECURITY__TRUSTED_PROXIES": "10.1.0.0/16", "CXR_ALLOWED_IPS": "10.0.0.0/8"}
    assert load_settings(None, environ=env).security.trusted_proxies == ["10.1.0.0/16"]


def test_data_path_is_the_base_of_relative_rag_data_paths(tmp_path: Path) -> None:
    from cxr_rag.config import rag_config

    models = {"rag": {"vector_db_path": "chroma", "documents_path": "/abs/corpus.jsonl"}}
    cfg = rag_config(Settings.model_validate({"data_path": str(tmp_path), "models": models}), environ={})
    assert cfg.vector_db_path == tmp_path / "chroma"
    assert cfg.documents_path == Path("/abs/corpus.jsonl")
    cfg = rag_config(Settings.model_validate({"models": {"rag": {"documents_path": "docs"}}}), environ={})
    assert cfg.vector_db_path == Path("var/data/chroma_db") and cfg.documents_path == Path("docs")


def test_environment_is_the_deployment_environment_of_traces(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from cxr_serving import tracing
    from cxr_serving.settings import MonitoringConfig

    monkeypatch.setattr(tracing, "_installed", True)  # leave the process-wide provider to the tracing tests
    cfg = MonitoringConfig(tracing_enabled=True)
    provider = tracing.setup_tracing("rag", cfg, exporter=InMemorySpanExporter(), environment="staging")
    assert provider is not None and provider.resource.attributes["deployment.environment"] == "staging"
