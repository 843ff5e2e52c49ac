"""Every settings key has an effect, or is refused at start with the reason (issue: no setting
accepted and then ignored)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from cxr_serving.errors import ConfigError
from cxr_serving.settings import Settings, load_settings
from tests.support.settings_reads import Schema, schema_keys, unread_keys

REPO = Path(__file__).resolve().parents[2]


SERVING = REPO / "libs/serving/src/cxr_serving"
CLS = REPO / "services/classification/src/cxr_classification"
SEG = REPO / "services/segmentation/src/cxr_segmentation"
RAG = REPO / "services/rag/src/cxr_rag"
DICOM = REPO / "services/dicom/src/cxr_dicom"
RUNTIMES = SERVING / "runtimes"  # reads the runtime section (`models.<name>.runtime`) a model hands it
# The code that runs the services: the client (libs/client) reads its own config, never these settings.
SERVER_SCOPE = (REPO / "libs/serving/src", REPO / "services", REPO / "gateway/src")


def all_schemas() -> list[Schema]:
    """Settings, and each service's schema of its `models.<name>` section (validated by model_section)."""
    from cxr_classification.config import BinaryClassifierConfig, ClassifierConfig, MultiLabelClassifierConfig
    from cxr_dicom.config import DicomConfig
    from cxr_rag.config import RagConfig
    from cxr_segmentation.config import SegmentationConfig

    cls = [
        Schema(m, "models.<classifier>.", (CLS, RUNTIMES))
        for m in (ClassifierConfig, BinaryClassifierConfig, MultiLabelClassifierConfig)
    ]
    return [
        Schema(Settings, "", SERVER_SCOPE),
        *cls,
        Schema(SegmentationConfig, "models.segmentation.", (SEG, RUNTIMES)),
        Schema(RagConfig, "models.rag.", (RAG,)),
        Schema(DicomConfig, "models.dicom.", (DICOM,)),
    ]


# Names that unrelated objects share: each such key counts as read only on the receiver named here, in the
# file named here (the code that consumes that section), never on any same-named attribute elsewhere.
GENERIC = {
    *("enabled", "device", "host", "port", "name", "model", "mode", "labels", "classes", "threshold", "seed"),
    *("models", "services"),
}
READERS: dict[str, list[tuple[Path, str, str]]] = {
    "models": [(SERVING / "settings.py", "self", "model_section")],  # each service's section, by its schema
    "services": [(SERVING / "settings.py", "self", "endpoint")],  # the server's own endpoint
    "services.host": [(SERVING / "server.py", "ep", "")],  # ep = settings.endpoint(binding.name)
    "services.port": [(SERVING / "server.py", "ep", "")],
    "server_config.device": [
        (CLS / "service.py", "settings.server_config", ""),
        (SEG / "service.py", "settings.server_config", ""),
    ],
    "security.tls.enabled": [(SERVING / "server.py", "tls", "")],  # tls = settings.security.tls
    "models.<classifier>.enabled": [(CLS / "service.py", "model.cfg", "")],  # required at start or not
    "models.<classifier>.labels": [(CLS / "config.py", "self", "output_labels")],  # the model's output labels
    "models.<classifier>.seed": [(CLS / "model.py", "cfg", "")],  # cfg = self.cfg, the ClassifierConfig
    "models.segmentation.enabled": [(SEG / "service.py", "cfg", "")],  # cfg = the SegmentationConfig
    "models.segmentation.name": [(SEG / "service.py", "cfg", "")],
    "models.segmentation.classes": [(SEG / "model.py", "cfg", "")],
    "models.segmentation.seed": [(SEG / "model.py", "self.cfg", "")],
    "models.segmentation.threshold": [(SEG / "servicer.py", "model.cfg", "")],
    "models.rag.enabled": [(RAG / "service.py", "cfg", "")],  # cfg = rag_config(settings)
    "models.rag.llm.mode": [(RAG / "runtime.py", "cfg.llm", "")],
    "models.rag.llm.model": [(RAG / "config.py", "self.llm", "llm_model")],
    "models.dicom.destinations.cstore.host": [(DICOM / "worker.py", "peer", "")],  # peer = the CStorePeer
    "models.dicom.destinations.cstore.port": [(DICOM / "worker.py", "peer", "")],
}


def test_every_settings_key_is_read_by_some_code() -> None:
    schemas = all_schemas()
    paths = [p for s in schemas for p, _, _ in schema_keys(s.model, s.prefix)]
    assert len(paths) > 120 and "security.tls.cert_file" in paths and "models.rag.llm.base_url" in paths
    unread = sorted(set(unread_keys(schemas, READERS, GENERIC)))
    assert unread == [], f"settings keys no code reads (give each an effect or refuse it at validation): {unread}"


def test_the_key_checker_reports_keys_read_only_in_docstrings_comments_or_on_other_receivers(tmp_path: Path) -> None:
    """The checker itself can fail: synthetic schema and code, one key per way of seeming read."""
    from pydantic import BaseModel

    class Inner(BaseModel):
        port: int = 0  # generic: read only on some other object
        retries: int = 0  # read for real through a subscript key

    class Toy(BaseModel):
        never_read: int = 0
        docstring_only: int = 0
        comment_only: int = 0
        string_only: int = 0
        read: int = 0
        via_get: int = 0
        inner: Inner = Inner()

    pkg = tmp_path / "toy"
    pkg.mkdir()
    (pkg / "app.py").write_text(
        '''"""Uses cfg.docstring_only and cfg.never_read, but only in this docstring."""


def run(cfg, raw, other):
    """Reads .docstring_only? No: a docstring."""
    # cfg.comment_only would go here
    label = "string_only"
    return cfg.read, raw.get("via_get"), raw["retries"], other.port, label
''',
        encoding="utf-8",
    )
    schema = Schema(Toy, "toy.", (pkg,))
    unread = unread_keys([schema], {}, {"port"})
    expected = ["comment_only", "docstring_only", "inner", "inner.port", "never_read", "string_only"]
    assert sorted(unread) == [f"toy.{k}" for k in expected]  # read, via_get and inner.retries are read
    (pkg / "server.py").write_text("def serve(settings):\n    return settings.inner.port\n", encoding="utf-8")
    readers = {"toy.inner.port": [(pkg / "server.py", "settings.inner", "")]}
    assert "toy.inner.port" not in unread_keys([schema], readers, {"port"})  # read on the named receiver
    assert "toy.inner.port" in unread_keys([schema], {"toy.inner.port": [(pkg / "server.py", "other", "")]}, {"port"})


@pytest.mark.parametrize(
    ("section", "key", "why"),
    [
        ("server_config", "cache_models", "stays loaded"),
        ("performance", "optimize_memory", "handed back"),
        ("monitoring", "enable_timing", "always measured"),
        ("monitoring", "metrics_file", "Prometheus endpoint"),
    ],
)
def test_guide_keys_without_use_are_refused_whatever_their_value(section, key, why) -> None:
    for value in (True, False, None, "/var/log/cxr-agent/metrics.json"):
        with pytest.raises(ConfigError) as err:
            load_settings(None, environ={f"CXR_{section.upper()}__{key.upper()}": json.dumps(value)})
        assert f"{section}.{key} is not supported" in str(err.value) and why in str(err.value)
        assert "Remove the key" in str(err.value)


@pytest.mark.parametrize("name", ["local.json", "production.json"])
def test_shipped_configs_load(name: str) -> None:
    load_settings(REPO / "config" / name, environ={})


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
    assert len(admin) == 14 and "/cxr.rag.v1.RagService/IngestDocuments" in admin
    assert "/cxr.segmentation.v1.SegmentationService/SetModelRouting" in admin
    assert "/cxr.classification.v1.ClassificationService/RecordModelEvaluation" in admin
    assert "/cxr.dicom.v1.DicomService/RetryDeadLetter" in admin
    for method in admin:
        env = {"CXR_SECURITY__UNAUTHENTICATED_METHODS": json.dumps([*health, method])}
        with pytest.raises(ConfigError, match="unauthenticated_methods lists admin RPCs") as err:
            load_settings(None, environ=env)
        assert method in str(err.value)
    env = {"CXR_SECURITY__UNAUTHENTICATED_METHODS": json.dumps([*health, "/cxr.rag.v1.RagService/SearchLiterature"])}
    assert load_settings(None, environ=env).security.unauthenticated_methods[-1].endswith("/SearchLiterature")


def test_platform_admin_methods_follow_the_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    """The admin set is the admin RPCs of the catalog's gRPC services, found in every generated cxr_protos
    module (no module named in code), so a new catalog service's admin RPCs are refused there too."""
    from cxr_serving import roles
    from cxr_serving.catalog import Catalog, load_catalog

    full = load_catalog()
    without_rag = Catalog(s for s in full.values() if s.name != "rag")
    monkeypatch.setattr(roles, "load_catalog", lambda: without_rag)
    roles.platform_admin_methods.cache_clear()
    try:
        admin = roles.platform_admin_methods()
        assert admin and not any(m.startswith("/cxr.rag.v1.") for m in admin)
        assert "/cxr.segmentation.v1.SegmentationService/LoadModel" in admin
        # a catalog gRPC service that no generated module defines is a configuration error, not a silent gap
        typo = next(iter(full.values()))
        bad = Catalog([dataclasses.replace(typo, grpc_services=("cxr.nowhere.v1.NoService",))])
        monkeypatch.setattr(roles, "load_catalog", lambda: bad)
        roles.platform_admin_methods.cache_clear()
        with pytest.raises(ConfigError, match=r"grpc_services: cxr.nowhere.v1.NoService is not defined"):
            roles.platform_admin_methods()
    finally:
        roles.platform_admin_methods.cache_clear()


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

    from cxr_serving import otel
    from cxr_serving.settings import MonitoringConfig

    monkeypatch.setattr(otel, "_installed", True)  # leave the process-wide provider to the tracing tests
    cfg = MonitoringConfig(tracing_enabled=True)
    provider = otel.setup_tracing("rag", cfg, exporter=InMemorySpanExporter(), environment="staging")
    assert provider is not None and provider.resource.attributes["deployment.environment"] == "staging"
