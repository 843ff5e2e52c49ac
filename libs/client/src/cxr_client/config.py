"""Where the services are and how to reach them: endpoints, API keys, TLS, deadlines.

One endpoint for everything (a gateway's gRPC port: `CXR_ENDPOINT`) or one per service
(`CXR_CLASSIFICATION_ENDPOINT`, `CXR_SEGMENTATION_ENDPOINT`, `CXR_RAG_ENDPOINT`, `CXR_<NAME>_ENDPOINT`
of any catalog service, which win over `CXR_ENDPOINT`). Without either, the local stack of `make run`
(127.0.0.1 and each service's catalog port: 50051-50053; `CXR_SERVICE_CATALOG` adds services).
An endpoint may carry a scheme: `grpcs://host:443` turns TLS on, `grpc://host:port` or a bare
`host:port` is plaintext unless `tls` is set.

Two keys: `api_key` (`CXR_API_KEY`) for inference calls and `admin_api_key` (`CXR_ADMIN_API_KEY`)
for the admin calls (LoadModel, UnloadModel, IngestDocuments, RetryDeadLetter). Each call sends exactly one of them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cxr_client import catalog
from cxr_client.catalog import ServiceEntry

ServiceName = str  # a service of the catalog: "classification", "segmentation", "rag" or an extra one
SERVICES: tuple[ServiceName, ...] = tuple(catalog.load())  # the platform's own services

LOCAL_ENDPOINTS: dict[ServiceName, str] = {name: f"127.0.0.1:{e.port}" for name, e in catalog.load().items()}

_TRUE = {"1", "true", "yes", "on"}


class TlsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    root_certs_file: Path | None = Field(default=None, description="PEM CA bundle; None: the system roots")
    client_cert_file: Path | None = Field(default=None, description="PEM client certificate for mutual TLS")
    client_key_file: Path | None = Field(default=None, description="PEM private key of client_cert_file")
    server_name_override: str | None = Field(default=None, description="expected server name (tests, IP endpoints)")


class ClientConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str | None = Field(default=None, description="one gRPC endpoint for every service (e.g. the gateway)")
    endpoints: dict[str, str] = Field(default_factory=dict, description="per-service overrides")
    api_key: str | None = Field(default=None, description="sent as x-api-key metadata on every inference call")
    admin_api_key: str | None = Field(
        default=None,
        description="sent as x-api-key instead of api_key, and only, on admin calls (LoadModel, UnloadModel, "
        "IngestDocuments, RetryDeadLetter)",
    )
    tls: TlsOptions = Field(default_factory=lambda: TlsOptions())
    timeout_s: float = Field(30.0, gt=0, description="default deadline of one call")
    max_message_mb: int = Field(64, gt=0)
    retries: bool = Field(True, description="apply cxr_client.retry_policy's service config")
    service_catalog: tuple[Path, ...] = Field(
        default=(), description="extra service catalog files (CXR_SERVICE_CATALOG): their services' ports and names"
    )

    @property
    def services(self) -> dict[ServiceName, ServiceEntry]:
        """Every service this client can reach by name: the platform's and the extra catalogs'."""
        return catalog.load(self.service_catalog)

    def endpoint_for(self, service: ServiceName) -> str:
        if self.endpoints.get(service):
            return self.endpoints[service]
        entry = self.services.get(service)
        if entry is None:
            raise ValueError(f"unknown service {service!r}: the service catalog has {sorted(self.services)}")
        return self.endpoint or f"127.0.0.1:{entry.port}"

    def target_for(self, service: ServiceName) -> tuple[str, bool]:
        """The gRPC target without scheme, and whether TLS is on for it."""
        return split_scheme(self.endpoint_for(service), self.tls.enabled)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> ClientConfig:
        env = os.environ if environ is None else environ
        extra = catalog.paths_from_env(env)
        names = catalog.load(extra)
        endpoints = {s: env[f"CXR_{s.upper()}_ENDPOINT"] for s in names if env.get(f"CXR_{s.upper()}_ENDPOINT")}

        def path(name: str) -> Path | None:
            return Path(env[name]) if env.get(name) else None

        root = path("CXR_TLS_ROOT_CERTS")
        tls = TlsOptions(
            enabled=env.get("CXR_TLS", "").lower() in _TRUE or root is not None,
            root_certs_file=root,
            client_cert_file=path("CXR_TLS_CLIENT_CERT"),
            client_key_file=path("CXR_TLS_CLIENT_KEY"),
            server_name_override=env.get("CXR_TLS_SERVER_NAME") or None,
        )
        key = env.get("CXR_API_KEY", "").split(",")[0].strip() or None
        admin_key = env.get("CXR_ADMIN_API_KEY", "").split(",")[0].strip() or None
        data: dict[str, object] = {
            "endpoint": env.get("CXR_ENDPOINT") or None,
            "endpoints": endpoints,
            "api_key": key,
            "admin_api_key": admin_key,
            "tls": tls,
            "service_catalog": extra,
        }
        if env.get("CXR_TIMEOUT_S"):
            data["timeout_s"] = float(env["CXR_TIMEOUT_S"])
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)


def split_scheme(endpoint: str, tls_default: bool) -> tuple[str, bool]:
    for scheme, tls in (("grpcs://", True), ("https://", True), ("grpc://", tls_default), ("http://", tls_default)):
        if endpoint.startswith(scheme):
            return endpoint[len(scheme) :].rstrip("/"), tls
    return endpoint, tls_default
