"""Typed settings: the deployment guide's JSON config shape plus `CXR_*` environment overrides.

Precedence (lowest to highest): model defaults < JSON file (`--config` or `CXR_CONFIG_PATH`)
< environment. Nested keys are reached with a double underscore, values parse as JSON when
they can (so `CXR_SERVER_CONFIG__MAX_BATCH_SIZE=16`, `CXR_SECURITY__ALLOWED_IMAGE_FORMATS='["png"]'`).
The guide's flat variables are honoured too: `CXR_LOG_LEVEL`, `CXR_API_KEY`, `CXR_MODELS_PATH`,
`CXR_DATA_PATH`, `VECTOR_DB_HOST`, `VECTOR_DB_PORT`; and `CXR_ADMIN_API_KEY` (comma list, as
`CXR_API_KEY`), `CXR_ADMIN_API_KEY_FILE`, `CXR_ALLOWED_IPS` (comma list of CIDR blocks).

The `models` section stays a mapping of raw dicts here: each service validates its own
section with its own pydantic model through `model_section()`, so a service never depends
on another service's schema, while all of them share one config file.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cxr_serving.catalog import Catalog, load_catalog
from cxr_serving.errors import ConfigError
from cxr_serving.optimize.event_loop import EventLoopChoice
from cxr_serving.roles import platform_admin_methods

ImageFormat = Literal["png", "jpg", "jpeg", "dcm"]
M = TypeVar("M", bound=BaseModel)
DEFAULT_IMAGE_FORMATS: tuple[ImageFormat, ...] = ("jpg", "jpeg", "png", "dcm")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Keys of the deployment guide's production.json that the services have no use for: each is refused, whatever its
# value, with the reason, so no key is accepted and then ignored.
_GUIDE_ONLY_KEYS: dict[tuple[str, str], str] = {
    ("server_config", "cache_models"): (
        "a model always stays loaded in memory from its load to UnloadModel (the services cannot serve a "
        "model they do not keep loaded). Remove the key"
    ),
    ("performance", "optimize_memory"): (
        "memory is always handed back after warm-up and on unload (the GPU allocator's cache is emptied); "
        "tune performance.cpu_heap_pad_mb instead. Remove the key"
    ),
    ("monitoring", "enable_timing"): (
        "latency is always measured (cxr_grpc_request_duration_seconds, cxr_inference_duration_seconds and "
        "the access log's ms). Remove the key"
    ),
    ("monitoring", "metrics_file"): (
        "metrics are served on the Prometheus endpoint (services.<name>.metrics_port) for scraping; no "
        "metrics file is written. Remove the key"
    ),
    ("security", "rate_limiting"): (
        "rate limiting is the gateway's job (Kong's rate-limiting plugin in gateway/kong.yml: per consumer, "
        "across every replica); a bucket in each service replica would allow replicas x the limit. Remove "
        "the key"
    ),
}


def _refuse_guide_only_keys(section: str, data: Any) -> Any:
    """Refuse a key only the guide has, whatever its value, with the reason the services have no use for it."""
    if not isinstance(data, dict):
        return data
    for (sec, key), why in _GUIDE_ONLY_KEYS.items():
        if sec == section and key in data:
            raise ValueError(f"{sec}.{key} is not supported: {why}")
    return data


def _cidrs(values: list[str]) -> list[str]:
    """Each entry an IPv4/IPv6 address or CIDR block (host bits allowed), normalised."""
    out = []
    for v in values:
        try:
            out.append(str(ipaddress.ip_network(v, strict=False)))
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address or CIDR block (e.g. 10.0.0.0/8)") from None
    return out


class ServerConfig(_Strict):
    """The guide's `server_config` plus runtime knobs of the shared server."""

    device: str = Field("cpu", description="'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available)")
    max_batch_size: int = Field(
        8, ge=1, le=1024, description="most requests the batcher puts into one forward (a model may set its own)"
    )
    max_batch_delay_ms: float = Field(
        5.0,
        ge=0,
        le=10_000,
        description="how long the batcher waits for more requests to fill a batch after the first arrives",
    )
    max_queue_size: int = Field(256, ge=1, description="requests waiting per model before RESOURCE_EXHAUSTED")
    num_workers: int = Field(4, ge=1, le=256, description="threads that decode and preprocess images")
    model_instances: int = Field(
        1,
        ge=1,
        le=64,
        description="batches each model runs at once (Triton's instance count): 1 on GPU; on CPU, "
        "cores / performance.cpu_threads so every core runs a forward",
    )
    model_instance_mode: Literal["thread", "process"] = Field(
        "thread",
        description="'thread': the model_instances share one copy of the model in the server process; "
        "'process': each instance is a worker process with its own copy (Triton's Python backend, "
        "LitServe's workers): on CPU the forwards then do not share the server's GIL",
    )
    frontend_processes: int | None = Field(
        None,
        ge=1,
        le=64,
        description="processes that take gRPC calls and decode/preprocess on the same port (SO_REUSEPORT), all "
        "feeding this node's one model executor through shared memory, so batches form across them; None: 1 on "
        "CPU, cores/2 on GPU. Model services only: rag and the DICOM node always run one (docs/serving-runtime.md)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="level of the service's logs (case-insensitive)"
    )
    event_loop: EventLoopChoice = Field(
        "auto",
        description="the server's asyncio loop: 'auto' runs uvloop when installed (cheaper wake-ups from the "
        "decode and model threads), else asyncio's own",
    )
    cpu_scheduling: Literal["batch", "normal", "inherit"] = Field(
        "batch",
        description="Linux scheduling policy the service puts all its threads under at start, replacing the one it "
        "was started with: 'batch' (SCHED_BATCH) keeps each thread's fair share of the CPU without wake-up "
        "preemption, so a request's threads (event loop, decode, model) do not keep interrupting one another; "
        "'normal' is the default policy (SCHED_OTHER); 'inherit' leaves the policy the process was started with "
        "(systemd's CPUSchedulingPolicy, chrt)",
    )
    max_message_mb: float = Field(
        64, gt=0, le=2047, description="largest gRPC message received or sent, so a whole image fits in one request"
    )
    keepalive_time_s: float = Field(30, gt=0, description="interval of the server's HTTP/2 keepalive pings")
    keepalive_timeout_s: float = Field(
        10, gt=0, description="a connection whose keepalive ping is not answered within this is closed"
    )
    shutdown_grace_s: float = Field(30, ge=0, description="in-flight requests get this long on SIGTERM")
    shutdown_delay_s: float = Field(0, ge=0, description="on SIGTERM, keep serving this long after NOT_SERVING")
    max_concurrent_rpcs: int | None = Field(
        None, ge=1, description="gRPC's cap on RPCs in progress at once (others get RESOURCE_EXHAUSTED); None: no cap"
    )

    @model_validator(mode="before")
    @classmethod
    def _guide_only(cls, data: Any) -> Any:
        return _refuse_guide_only_keys("server_config", data)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("cpu", "cuda", "auto") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("must be 'cpu', 'cuda', 'cuda:N' or 'auto'")


class PerformanceConfig(_Strict):
    """The guide's `performance`: GPU paths (no-ops on CPU), plus use_amp, channels_last, fold_batchnorm,
    cpu_threads, cpu_heap_pad_mb and trace_models, which apply on CPU too."""

    use_amp: bool = Field(
        False,
        description="mixed precision: autocast to amp_dtype on GPU; bfloat16 on CPUs with AVX512-BF16/AMX "
        "(ignored on other CPUs, where bfloat16 is emulated and slower). Each model reports its precision in "
        "ListModels",
    )
    amp_dtype: Literal["bfloat16", "float16"] = Field(
        "bfloat16", description="GPU: the autocast dtype of use_amp (CPUs always use bfloat16)"
    )
    amp_tolerance: float = Field(
        0.05,
        gt=0,
        le=1,
        description="a model keeps AMP only if its output on a test input at load stays within this fraction "
        "of its float32 output's scale; otherwise it serves float32 (a guard against networks that break "
        "in reduced precision)",
    )
    compile_models: bool = Field(False, description="GPU: serve each network through torch.compile (inductor)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile's mode when compile_models is on. The max-autotune modes time Triton kernels "
        "for every shape at start-up, which makes start-up much longer; reduce-overhead "
        "records CUDA graphs (one per batch size the warm-up runs)",
    )
    cuda_graphs: bool = Field(
        True,
        description="GPU: record each forward once per batch size as a CUDA graph and replay it (one launch "
        "instead of one per kernel from Python); checked against the eager network at load, "
        "which serves instead if recording fails. Not combined with compile_models",
    )
    channels_last: bool = Field(True, description="NHWC convolutions, on GPU and on CPU (oneDNN: faster U-Net)")
    fold_batchnorm: bool = Field(
        True,
        description="fold each BatchNorm into the convolution before it when a model loads (same outputs "
        "up to float rounding, one pass over the activations instead of two)",
    )
    cpu_threads: int | None = Field(
        None, ge=1, le=1024, description="torch intra-op threads on CPU; None: torch's default (one per core)"
    )
    trace_models: bool = Field(
        True,
        description="on CPU in float32, run each network as a TorchScript trace frozen at load (no Python per "
        "module per forward); kept only if it answers like "
        "the eager network on two test batches, else eager (the load logs why). Not combined with use_amp",
    )
    cpu_heap_pad_mb: int = Field(
        256,
        ge=0,
        le=2047,
        description="glibc: one heap for all threads, no per-allocation mmap, and this many MiB kept after "
        "frees, so forwards reuse their activation memory instead of page-faulting it back in; 0 leaves "
        "glibc's defaults. Applies for the life of the process",
    )
    tf32: bool = Field(True, description="GPU: let matmuls and convolutions use TensorFloat-32 (faster float32)")
    cudnn_benchmark: bool = Field(
        False,
        description="GPU: let cuDNN time every convolution algorithm for each new input shape. The batcher forms "
        "every batch size up to max_batch_size and the GPU warm-up runs each, so start-up grows per "
        "convolutional model with no throughput gain in return; off uses cuDNN's heuristics",
    )
    warmup_batches: int = Field(
        1,
        ge=0,
        le=100,
        description="forwards per warmed batch size at load (batch 1 on CPU, every size up to max_batch_size on "
        "GPU), so no request pays for first-call set-up; 0: no warm-up",
    )

    @model_validator(mode="before")
    @classmethod
    def _guide_only(cls, data: Any) -> Any:
        return _refuse_guide_only_keys("performance", data)


class TlsConfig(_Strict):
    enabled: bool = Field(False, description="serve gRPC over TLS; needs cert_file and key_file")
    cert_file: Path | None = Field(None, description="PEM server certificate (chain)")
    key_file: Path | None = Field(None, description="PEM private key of cert_file")
    client_ca_file: Path | None = Field(None, description="set to require client certificates (mutual TLS)")


class SecurityConfig(_Strict):
    enable_authentication: bool = Field(
        True,
        description="require an API key on every RPC except unauthenticated_methods; false also refuses admin RPCs",
    )
    api_keys: list[str] = Field(default_factory=list, description="prefer api_key_file or CXR_API_KEY")
    api_key_file: Path | None = Field(None, description="one key per line; re-read when it changes")
    admin_api_keys: list[str] = Field(
        default_factory=list,
        description="keys that may also call admin RPCs (LoadModel, UnloadModel, IngestDocuments: the "
        "`(cxr.common.v1.access) = ACCESS_ADMIN` option in the protos); prefer admin_api_key_file or "
        "CXR_ADMIN_API_KEY",
    )
    admin_api_key_file: Path | None = Field(None, description="one admin key per line; re-read when it changes")
    unauthenticated_methods: list[str] = Field(
        default_factory=lambda: ["/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"],
        description="full method names reachable without a key (probes cannot send one)",
    )
    allowed_image_formats: list[ImageFormat] = Field(
        default_factory=lambda: list(DEFAULT_IMAGE_FORMATS),
        description="image formats accepted, recognised from the bytes (others: IMAGE_FORMAT_UNKNOWN)",
    )
    max_image_size_mb: float = Field(50, gt=0, description="larger encoded images are refused (IMAGE_TOO_LARGE)")
    max_image_pixels: int = Field(50_000_000, ge=1, description="decompression-bomb cap (width*height*frames)")
    min_image_side: int = Field(64, ge=8, description="smaller images are refused (IMAGE_TOO_SMALL) by every service")
    max_image_aspect_ratio: float = Field(
        4.0, ge=1.0, allow_inf_nan=False, description="longer/shorter side above this is refused (IMAGE_ASPECT_RATIO)"
    )
    allowed_ips: list[str] = Field(
        default_factory=list,
        description="CIDR blocks callers may connect from (empty: any); others get PERMISSION_DENIED "
        "IP_NOT_ALLOWED. Health probes (unauthenticated_methods) are exempt",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="CIDR blocks of the gateways: only a call from one of them has its X-Forwarded-For "
        "read to find the client address that allowed_ips checks",
    )
    tls: TlsConfig = Field(default_factory=TlsConfig, description="server TLS")  # type: ignore[arg-type]
    anonymize_dicom: bool = Field(
        False,
        description="strip patient/institution identifiers and private tags from DICOM input right after "
        "reading (PatientName/PatientID become ANONYMIZED), so nothing downstream (DICOM-SEG, logs) carries them. "
        "The DICOM node keeps the ORIGINAL instance in its data_path and sends only an anonymized copy to the "
        "classification and segmentation services; it builds the SR from the original header and overwrites the "
        "SEG's patient and study attributes from it, so results go back under the source's patient and study",
    )

    @field_validator("allowed_image_formats", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return [s.lower() for s in v] if isinstance(v, list) else v

    @model_validator(mode="before")
    @classmethod
    def _guide_only(cls, data: Any) -> Any:
        return _refuse_guide_only_keys("security", data)

    @field_validator("allowed_ips", "trusted_proxies", "api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v

    @field_validator("allowed_ips", "trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        return _cidrs(v)

    @model_validator(mode="after")
    def _no_ignored_security(self) -> SecurityConfig:
        """Refuse settings that would be accepted and then ignored, or that would open an admin RPC."""
        if not self.enable_authentication and (self.admin_api_keys or self.admin_api_key_file):
            raise ValueError(
                "admin_api_keys/admin_api_key_file are set but enable_authentication is false: no key is checked "
                "then and admin RPCs are refused (ADMIN_REQUIRED); turn authentication on or remove the admin keys"
            )
        admin = sorted(set(self.unauthenticated_methods) & platform_admin_methods())
        if admin:
            raise ValueError(f"unauthenticated_methods lists admin RPCs {admin}: admin RPCs always need an admin key")
        if self.trusted_proxies and not self.allowed_ips:
            raise ValueError(
                "trusted_proxies is set without allowed_ips: X-Forwarded-For is read only to find the address "
                "that allowed_ips checks, so it would be ignored; set allowed_ips or remove trusted_proxies"
            )
        return self


class MonitoringConfig(_Strict):
    enable_metrics: bool = Field(
        True, description="serve Prometheus metrics on the service's metrics_port; false opens no metrics port"
    )
    log_json: bool = Field(True, description="JSON-lines logs (one object per line) instead of plain text")
    log_file: Path | None = Field(None, description="rotating file handler (100 MB x 10), as in the deployment guide")
    tracing_enabled: bool = Field(False, description="export OpenTelemetry traces over OTLP/gRPC to otlp_endpoint")
    otlp_endpoint: str | None = Field(None, description="e.g. http://otel-collector:4317")
    service_name_prefix: str = Field("cxr", description="traces name each service <prefix>-<service>")

    @model_validator(mode="before")
    @classmethod
    def _guide_only(cls, data: Any) -> Any:
        return _refuse_guide_only_keys("monitoring", data)


class ServiceEndpoint(_Strict):
    """Where one service listens."""

    host: str = Field(
        default="127.0.0.1",
        description="address the gRPC and metrics ports bind to; loopback unless a deployment opens it "
        "(the chart and config/production.json set 0.0.0.0 behind a NetworkPolicy)",
    )
    port: int = Field(..., ge=0, le=65535, description="the gRPC port; 0 picks a free one (tests)")
    metrics_port: int = Field(
        ..., ge=0, le=65535, description="the Prometheus /metrics port; 0 picks a free one (tests)"
    )


def _paths(v: Any) -> Any:
    """A string is a list of paths separated by os.pathsep (the CXR_SERVICE_CATALOG form)."""
    return [p for p in v.split(os.pathsep) if p.strip()] if isinstance(v, str) else v


class Settings(_Strict):
    """The whole config file."""

    environment: str = Field(
        "development", description="CXR_ENV; traces carry it as the deployment.environment resource attribute"
    )
    models_path: Path | None = Field(None, description="base for relative checkpoint paths (CXR_MODELS_PATH)")
    data_path: Path | None = Field(
        None, description="base for relative data paths: models.rag.vector_db_path, documents_path (CXR_DATA_PATH)"
    )
    models: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="one entry per model, each validated by its service's own schema (see the model sections)",
    )
    server_config: ServerConfig = Field(
        default_factory=ServerConfig,  # type: ignore[arg-type]
        description="the shared gRPC server, batcher and decode pool",
    )
    performance: PerformanceConfig = Field(
        default_factory=PerformanceConfig,  # type: ignore[arg-type]
        description="how models run: precision, compilation and the CPU/GPU speed paths",
    )
    security: SecurityConfig = Field(
        default_factory=SecurityConfig,  # type: ignore[arg-type]
        description="API keys, address allow-list, TLS and the checks every image passes before decoding",
    )
    monitoring: MonitoringConfig = Field(
        default_factory=MonitoringConfig,  # type: ignore[arg-type]
        description="logs, Prometheus metrics and OpenTelemetry tracing",
    )
    service_catalog: list[Path] = Field(
        default_factory=list,
        description="extra service catalog files (CXR_SERVICE_CATALOG, separated by os.pathsep) added to "
        "cxr_serving/services.json: how a service is registered without a code change (docs/adding-a-service.md)",
    )
    services: dict[str, ServiceEndpoint] = Field(
        default_factory=dict,
        description="where each service listens; a catalog service's port and metrics_port default to its "
        "catalog entry's",
    )

    @model_validator(mode="before")
    @classmethod
    def _catalog_endpoints(cls, data: Any) -> Any:
        """Give every catalog service (built-in and extra) an endpoint; the config's own entries win, and an
        entry for a service the catalog lacks (a typo) is refused rather than ignored."""
        if not isinstance(data, dict) or not isinstance(data.get("services", {}), dict):
            return data
        extra = _paths(data.get("service_catalog") or [])
        if not isinstance(extra, list):
            return data  # the field's own validation reports the wrong type
        defaults = {
            name: {"port": spec.port, "metrics_port": spec.metrics_port} for name, spec in load_catalog(extra).items()
        }
        services = dict(data.get("services", {}))
        unknown = sorted(set(services) - set(defaults))
        if unknown:
            raise ConfigError(
                f"services.{unknown[0]}: no such service in the service catalog {sorted(defaults)} "
                "(add one with an extra catalog file in service_catalog / CXR_SERVICE_CATALOG)"
            )
        for name, ports in defaults.items():
            given = services.get(name, {})
            services[name] = {**ports, **given} if isinstance(given, dict) else given
        return {**data, "services": services}

    @field_validator("service_catalog", mode="before")
    @classmethod
    def _split_catalog(cls, v: Any) -> Any:
        return _paths(v)

    def catalog(self) -> Catalog:
        """The service catalog these settings run with: built-in services plus `service_catalog` files."""
        return load_catalog(self.service_catalog)

    def endpoint(self, service: str) -> ServiceEndpoint:
        try:
            return self.services[service]
        except KeyError:
            raise ConfigError(f"services.{service}: no endpoint configured for service '{service}'") from None

    def model_section(self, name: str, schema: type[M]) -> M | None:
        """Validate `models.<name>` with the service's own schema; None when absent."""
        raw = self.models.get(name)
        if raw is None:
            return None
        try:
            return schema.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(_format_validation_error(exc, prefix=f"models.{name}")) from None

    def resolve_model_path(self, path: str | Path | None) -> Path | None:
        if path is None or str(path) == "":
            return None
        p = Path(path)
        if not p.is_absolute() and self.models_path is not None:
            p = self.models_path / p
        return p

    def resolve_data_path(self, path: str | Path) -> Path:
        p = Path(path)
        if not p.is_absolute() and self.data_path is not None:
            p = self.data_path / p
        return p


# The guide's variables that are not of the CXR_<SECTION>__<FIELD> form.
_FLAT_ENV: dict[str, tuple[str, ...]] = {
    "CXR_ENV": ("environment",),
    "CXR_LOG_LEVEL": ("server_config", "log_level"),
    "CXR_API_KEY": ("security", "api_keys"),
    "CXR_API_KEY_FILE": ("security", "api_key_file"),
    "CXR_ADMIN_API_KEY": ("security", "admin_api_keys"),
    "CXR_ADMIN_API_KEY_FILE": ("security", "admin_api_key_file"),
    "CXR_ALLOWED_IPS": ("security", "allowed_ips"),
    "CXR_MODELS_PATH": ("models_path",),
    "CXR_DATA_PATH": ("data_path",),
    "CXR_DEVICE": ("server_config", "device"),
    "CXR_SERVICE_CATALOG": ("service_catalog",),
}
_IGNORED_ENV = {"CXR_CONFIG_PATH", "CXR_ENDPOINT"}
# The deployment guide's Chroma variables: the host is taken as is, the port parses as JSON.
_VECTOR_DB_ENV: dict[str, tuple[str, ...]] = {
    "VECTOR_DB_HOST": ("models", "rag", "vector_db_host"),
    "VECTOR_DB_PORT": ("models", "rag", "vector_db_port"),
}


def _parse_env_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        nxt = node.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            node[key] = nxt
        node = nxt
    node[path[-1]] = value


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Translate `CXR_*` variables into a nested dict to merge over the file."""
    tree: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if name in _FLAT_ENV:
            path = _FLAT_ENV[name]
            value: Any = raw if path[-1] in ("api_keys", "admin_api_keys", "allowed_ips") else _parse_env_value(raw)
            if path[-1] in ("api_keys", "admin_api_keys"):
                value = [k.strip() for k in raw.split(",") if k.strip()]
            _set_path(tree, path, value)
        elif name.startswith("CXR_") and "__" in name and name not in _IGNORED_ENV:
            parts = tuple(p.lower() for p in name[4:].split("__"))
            if all(parts):
                _set_path(tree, parts, _parse_env_value(raw))
    for name, path in _VECTOR_DB_ENV.items():
        guide_value = environ.get(name)
        if guide_value:
            _set_path(tree, path, guide_value if name == "VECTOR_DB_HOST" else _parse_env_value(guide_value))
    return tree


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        field = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        lines.append(f"{field}: {err['msg']}" if field else err["msg"])
    return "invalid configuration: " + "; ".join(lines)


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the JSON file (if any), apply env overrides, validate. Raises ConfigError."""
    env = os.environ if environ is None else environ
    path = path or env.get("CXR_CONFIG_PATH") or None
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"config file {p}: cannot read ({exc.strerror})") from None
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"config file {p}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
            ) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a JSON object")
        data = loaded
    data = _deep_merge(data, env_overrides(env))
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None
