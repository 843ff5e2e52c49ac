"""A typed model of the Kong 3.x DB-less declarative subset that `gateway/kong.yml` uses.

Field names, types and defaults follow Kong's entity and plugin schemas (Kong 3.x docs);
anything else fails: an unknown top-level key, entity field, plugin name or plugin config
field is a validation error, as Kong itself would refuse it at `kong config parse`.

Environment placeholders use decK's syntax, `${{ env "DECK_NAME" }}`, so the same file
works with `deck file render` (decK substitutes DECK_* variables) before Kong loads it.
`render()` does that substitution here, falling back to the `defaults` mapping (the local
stand-in derives those from config/local.json) and failing on a variable with neither.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PLACEHOLDER_RE = re.compile(r"\$\{\{\s*env\s+\"(?P<name>DECK_[A-Z0-9_]+)\"\s*\}\}")


class KongConfigError(ValueError):
    """kong.yml is unreadable, has an unresolved placeholder or does not validate."""


class _Kong(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --------------------------------------------------------------------------- plugins
class KeyAuthConfig(_Kong):
    key_names: list[str] = Field(default_factory=lambda: ["apikey"], min_length=1)
    hide_credentials: bool = False
    anonymous: str | None = None
    key_in_header: bool = True
    key_in_query: bool = True
    key_in_body: bool = False
    run_on_preflight: bool = True
    realm: str | None = None


class RedisConfig(_Kong):
    host: str | None = None
    port: int | None = Field(6379, ge=0, le=65535)
    username: str | None = None
    password: str | None = None
    database: int = 0
    timeout: int = 2000
    ssl: bool = False
    ssl_verify: bool = False
    server_name: str | None = None


class RateLimitingConfig(_Kong):
    second: float | None = Field(None, gt=0)
    minute: float | None = Field(None, gt=0)
    hour: float | None = Field(None, gt=0)
    day: float | None = Field(None, gt=0)
    month: float | None = Field(None, gt=0)
    year: float | None = Field(None, gt=0)
    limit_by: Literal["consumer", "consumer-group", "credential", "ip", "service", "header", "path"] = "consumer"
    header_name: str | None = None
    path: str | None = None
    policy: Literal["local", "cluster", "redis"] = "local"
    fault_tolerant: bool = True
    hide_client_headers: bool = False
    sync_rate: float = -1
    error_code: int = Field(429, ge=0)
    error_message: str = "API rate limit exceeded"
    redis: RedisConfig | None = None

    @model_validator(mode="after")
    def _one_window(self) -> RateLimitingConfig:
        if not any(getattr(self, w) for w in WINDOWS):
            raise ValueError("at least one of second, minute, hour, day, month or year must be set")
        if self.policy == "redis" and (self.redis is None or not self.redis.host):
            raise ValueError("policy 'redis' needs redis.host")
        return self


WINDOWS: dict[str, int] = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "month": 2592000,
    "year": 31536000,
}


class RequestSizeLimitingConfig(_Kong):
    allowed_payload_size: int = Field(128, gt=0)
    size_unit: Literal["megabytes", "kilobytes", "bytes"] = "megabytes"
    require_content_length: bool = False

    @property
    def limit_bytes(self) -> int:
        scale = {"megabytes": 1024 * 1024, "kilobytes": 1024, "bytes": 1}[self.size_unit]
        return self.allowed_payload_size * scale


class CorrelationIdConfig(_Kong):
    header_name: str = "Kong-Request-ID"
    generator: Literal["uuid", "uuid#counter", "tracker"] = "uuid#counter"
    echo_downstream: bool = False


class PrometheusConfig(_Kong):
    per_consumer: bool = False
    status_code_metrics: bool = False
    latency_metrics: bool = False
    bandwidth_metrics: bool = False
    upstream_health_metrics: bool = False
    ai_metrics: bool = False


class QueueConfig(_Kong):
    max_batch_size: int = Field(1, ge=1)
    max_coalescing_delay: float = Field(1, ge=0)
    max_entries: int = Field(10000, ge=1)
    max_bytes: int | None = None
    max_retry_time: float = 60
    initial_retry_delay: float = 0.01
    max_retry_delay: float = 60
    concurrency_limit: Literal[-1, 1] = 1


class OpenTelemetryConfig(_Kong):
    traces_endpoint: str | None = None
    logs_endpoint: str | None = None
    endpoint: str | None = Field(None, description="deprecated alias of traces_endpoint (Kong < 3.8)")
    headers: dict[str, str] | None = None
    resource_attributes: dict[str, str] | None = None
    queue: QueueConfig | None = None
    batch_span_count: int | None = None
    batch_flush_delay: int | None = None
    connect_timeout: int = 1000
    send_timeout: int = 5000
    read_timeout: int = 5000
    http_response_header_for_traceid: str | None = None
    header_type: Literal["preserve", "ignore", "b3", "b3-single", "w3c", "jaeger", "ot", "aws", "gcp", "datadog"] = (
        "preserve"
    )
    sampling_rate: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _endpoint(self) -> OpenTelemetryConfig:
        if not (self.traces_endpoint or self.logs_endpoint or self.endpoint):
            raise ValueError("one of traces_endpoint, logs_endpoint or endpoint is required")
        return self


class AclConfig(_Kong):
    """acl: which consumer groups (a consumer's `acls` entries) may use a route or service."""

    allow: list[str] | None = None
    deny: list[str] | None = None
    hide_groups_header: bool = False

    @model_validator(mode="after")
    def _one_list(self) -> AclConfig:
        if (self.allow is None) == (self.deny is None):  # Kong: only_one_of + at_least_one_of
            raise ValueError("exactly one of 'allow' or 'deny' must be set")
        return self


class GrpcGatewayConfig(_Kong):
    proto: str = Field(..., min_length=1, description="path of the .proto file on the Kong node")


class _PluginBase(_Kong):
    enabled: bool = True
    protocols: list[Literal["grpc", "grpcs", "http", "https", "tcp", "tls", "udp", "ws", "wss"]] | None = None
    tags: list[str] | None = None
    instance_name: str | None = None
    # top-level plugins may scope themselves to entities by name
    service: str | None = None
    route: str | None = None
    consumer: str | None = None


class KeyAuthPlugin(_PluginBase):
    name: Literal["key-auth"]
    config: KeyAuthConfig = Field(default_factory=KeyAuthConfig)


class RateLimitingPlugin(_PluginBase):
    name: Literal["rate-limiting"]
    config: RateLimitingConfig


class RequestSizeLimitingPlugin(_PluginBase):
    name: Literal["request-size-limiting"]
    config: RequestSizeLimitingConfig = Field(default_factory=RequestSizeLimitingConfig)


class CorrelationIdPlugin(_PluginBase):
    name: Literal["correlation-id"]
    config: CorrelationIdConfig = Field(default_factory=CorrelationIdConfig)


class PrometheusPlugin(_PluginBase):
    name: Literal["prometheus"]
    config: PrometheusConfig = Field(default_factory=PrometheusConfig)


class OpenTelemetryPlugin(_PluginBase):
    name: Literal["opentelemetry"]
    config: OpenTelemetryConfig


class AclPlugin(_PluginBase):
    name: Literal["acl"]
    config: AclConfig

    @model_validator(mode="after")
    def _no_consumer(self) -> AclPlugin:
        if self.consumer:  # Kong's acl schema: typedefs.no_consumer
            raise ValueError("the acl plugin cannot be scoped to a consumer")
        return self


class GrpcGatewayPlugin(_PluginBase):
    name: Literal["grpc-gateway"]
    config: GrpcGatewayConfig


Plugin = Annotated[
    KeyAuthPlugin
    | RateLimitingPlugin
    | RequestSizeLimitingPlugin
    | CorrelationIdPlugin
    | PrometheusPlugin
    | OpenTelemetryPlugin
    | GrpcGatewayPlugin
    | AclPlugin,
    Field(discriminator="name"),
]
PLUGIN_NAMES = (
    "key-auth",
    "rate-limiting",
    "request-size-limiting",
    "correlation-id",
    "prometheus",
    "opentelemetry",
    "grpc-gateway",
    "acl",
)


# --------------------------------------------------------------------------- entities
Protocol = Literal["grpc", "grpcs", "http", "https"]
HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _default_protocols() -> list[Protocol]:
    """Kong's route default, typed so the list is one of Protocol, not of str."""
    return ["http", "https"]


class Route(_Kong):
    name: str = Field(..., min_length=1)
    protocols: list[Protocol] = Field(default_factory=_default_protocols, min_length=1)
    paths: list[str] | None = None
    methods: list[HttpMethod] | None = None
    hosts: list[str] | None = None
    headers: dict[str, list[str]] | None = None
    strip_path: bool = True
    preserve_host: bool = False
    regex_priority: int = 0
    path_handling: Literal["v0", "v1"] = "v0"
    https_redirect_status_code: Literal[426, 301, 302, 307, 308] = 426
    request_buffering: bool = True
    response_buffering: bool = True
    tags: list[str] | None = None
    plugins: list[Plugin] = Field(default_factory=list)

    @field_validator("paths")
    @classmethod
    def _paths(cls, v: list[str] | None) -> list[str] | None:
        for p in v or []:
            if not (p.startswith("/") or p.startswith("~/")):
                raise ValueError(f"path {p!r} must start with '/' (or '~/' for a regex)")
            if p.startswith("~"):
                try:
                    re.compile(p[1:])
                except re.error as exc:
                    raise ValueError(f"path {p!r} is not a valid regex: {exc}") from None
        return v

    @model_validator(mode="after")
    def _kong_route_rules(self) -> Route:
        grpc = any(p in ("grpc", "grpcs") for p in self.protocols)
        if grpc and any(p in ("http", "https") for p in self.protocols):
            raise ValueError("protocols: 'grpc'/'grpcs' and 'http'/'https' are mutually exclusive")
        if grpc and self.strip_path:  # Kong's grpc route subschema
            raise ValueError("cannot set 'strip_path' when 'protocols' is 'grpc' or 'grpcs'")
        if grpc and self.methods:
            raise ValueError("cannot set 'methods' when 'protocols' is 'grpc' or 'grpcs'")
        if not (self.paths or self.methods or self.hosts or self.headers):
            raise ValueError("must set one of 'methods', 'hosts', 'headers', 'paths'")
        return self


class Service(_Kong):
    name: str = Field(..., min_length=1)
    protocol: Protocol = "http"
    host: str = Field(..., min_length=1)
    port: int = Field(80, ge=0, le=65535)
    path: str | None = None
    retries: int = Field(5, ge=0, le=32767)
    connect_timeout: int = Field(60000, ge=1)
    write_timeout: int = Field(60000, ge=1)
    read_timeout: int = Field(60000, ge=1)
    tls_verify: bool | None = None
    tls_verify_depth: int | None = Field(None, ge=0, le=64)
    ca_certificates: list[str] | None = None
    client_certificate: str | None = None
    enabled: bool = True
    tags: list[str] | None = None
    routes: list[Route] = Field(default_factory=list)
    plugins: list[Plugin] = Field(default_factory=list)

    @model_validator(mode="after")
    def _grpc_path(self) -> Service:
        if self.protocol in ("grpc", "grpcs") and self.path:
            raise ValueError("'path' cannot be set when 'protocol' is 'grpc' or 'grpcs'")
        return self


class ActiveHealthy(_Kong):
    interval: float = Field(0, ge=0)
    successes: int = Field(0, ge=0, le=255)
    http_statuses: list[int] = Field(default_factory=lambda: [200, 302])


class ActiveUnhealthy(_Kong):
    interval: float = Field(0, ge=0)
    tcp_failures: int = Field(0, ge=0, le=255)
    timeouts: int = Field(0, ge=0, le=255)
    http_failures: int = Field(0, ge=0, le=255)
    http_statuses: list[int] = Field(default_factory=lambda: [429, 404, 500, 501, 502, 503, 504, 505])


class ActiveHealthcheck(_Kong):
    type: Literal["tcp", "http", "https", "grpc", "grpcs"] = "http"
    timeout: float = Field(1, ge=0)
    concurrency: int = Field(10, ge=1, le=2147483648)
    http_path: str = "/"
    headers: dict[str, list[str]] | None = None
    https_verify_certificate: bool = True
    https_sni: str | None = None
    healthy: ActiveHealthy = Field(default_factory=ActiveHealthy)
    unhealthy: ActiveUnhealthy = Field(default_factory=ActiveUnhealthy)


class PassiveHealthy(_Kong):
    successes: int = Field(0, ge=0, le=255)
    http_statuses: list[int] = Field(default_factory=lambda: [200, 201, 202, 203, 204, 205, 206, 207, 208, 226])


class PassiveUnhealthy(_Kong):
    tcp_failures: int = Field(0, ge=0, le=255)
    timeouts: int = Field(0, ge=0, le=255)
    http_failures: int = Field(0, ge=0, le=255)
    http_statuses: list[int] = Field(default_factory=lambda: [429, 500, 503])


class PassiveHealthcheck(_Kong):
    type: Literal["tcp", "http", "https", "grpc", "grpcs"] = "http"
    healthy: PassiveHealthy = Field(default_factory=PassiveHealthy)
    unhealthy: PassiveUnhealthy = Field(default_factory=PassiveUnhealthy)


class Healthchecks(_Kong):
    active: ActiveHealthcheck = Field(default_factory=ActiveHealthcheck)
    passive: PassiveHealthcheck = Field(default_factory=PassiveHealthcheck)
    threshold: float = Field(0, ge=0, le=100)


class Target(_Kong):
    target: str = Field(..., pattern=r"^[^:\s]+:\d{1,5}$", description="host:port")
    weight: int = Field(100, ge=0, le=65535)
    tags: list[str] | None = None

    @property
    def host(self) -> str:
        return self.target.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.target.rsplit(":", 1)[1])


class Upstream(_Kong):
    name: str = Field(..., min_length=1)
    algorithm: Literal["round-robin", "consistent-hashing", "least-connections", "latency"] = "round-robin"
    slots: int = Field(10000, ge=10, le=65536)
    host_header: str | None = None
    healthchecks: Healthchecks = Field(default_factory=Healthchecks)
    targets: list[Target] = Field(default_factory=list)
    tags: list[str] | None = None


class KeyAuthCredential(_Kong):
    key: str = Field(..., min_length=1)
    ttl: int | None = Field(None, ge=0)
    tags: list[str] | None = None


class AclGroup(_Kong):
    """One `acls` entry of a consumer: a group name the acl plugin's allow/deny lists refer to."""

    group: str = Field(..., min_length=1)
    tags: list[str] | None = None


class Consumer(_Kong):
    username: str | None = None
    custom_id: str | None = None
    tags: list[str] | None = None
    keyauth_credentials: list[KeyAuthCredential] = Field(default_factory=list)
    acls: list[AclGroup] = Field(default_factory=list)
    plugins: list[Plugin] = Field(default_factory=list)

    @model_validator(mode="after")
    def _identity(self) -> Consumer:
        if not (self.username or self.custom_id):
            raise ValueError("at least one of 'username' or 'custom_id' must be set")
        return self

    @property
    def name(self) -> str:
        return self.username or self.custom_id or ""

    @property
    def groups(self) -> list[str]:
        return [a.group for a in self.acls]


class KongConfig(_Kong):
    format_version: Literal["3.0"] = Field(..., alias="_format_version")
    transform: bool = Field(True, alias="_transform")
    services: list[Service] = Field(default_factory=list)
    upstreams: list[Upstream] = Field(default_factory=list)
    consumers: list[Consumer] = Field(default_factory=list)
    plugins: list[Plugin] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> KongConfig:
        _unique("services", [s.name for s in self.services])
        _unique("routes", [r.name for s in self.services for r in s.routes])
        _unique("upstreams", [u.name for u in self.upstreams])
        _unique("consumers", [c.name for c in self.consumers])
        _unique("keyauth_credentials", [k.key for c in self.consumers for k in c.keyauth_credentials])
        services = {s.name for s in self.services}
        routes = {r.name for s in self.services for r in s.routes}
        consumers = {c.name for c in self.consumers}
        for p in self.plugins:
            if p.service and p.service not in services:
                raise ValueError(f"plugin {p.name}: unknown service {p.service!r}")
            if p.route and p.route not in routes:
                raise ValueError(f"plugin {p.name}: unknown route {p.route!r}")
            if p.consumer and p.consumer not in consumers:
                raise ValueError(f"plugin {p.name}: unknown consumer {p.consumer!r}")
        # stricter than Kong: an acl group that no consumer has is a typo that would lock a route
        groups = {g for c in self.consumers for g in c.groups}
        for p in self.all_plugins():
            if isinstance(p, AclPlugin):
                unknown = sorted(set(p.config.allow or p.config.deny or []) - groups)
                if unknown:
                    raise ValueError(f"plugin acl: group(s) {unknown} are in no consumer's acls")
        return self

    def all_plugins(self) -> list[Any]:
        """Every plugin instance: global, per service, per route and per consumer."""
        out: list[Any] = list(self.plugins)
        for s in self.services:
            out += s.plugins
            for r in s.routes:
                out += r.plugins
        for c in self.consumers:
            out += c.plugins
        return out

    # ---- lookups used by the stand-in
    def upstream(self, name: str) -> Upstream | None:
        return next((u for u in self.upstreams if u.name == name), None)

    def service(self, name: str) -> Service:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)

    def global_plugin(self, name: str) -> Any:
        """The enabled global plugin (no service/route/consumer scope) called `name`, or None."""
        for p in self.plugins:
            if p.name == name and p.enabled and not (p.service or p.route or p.consumer):
                return p
        return None

    def plugin_for(self, name: str, service: Service, route: Route | None) -> Any:
        """Kong's precedence for one request: route > service > global (consumer scoping not used here)."""
        scoped = [p for p in (route.plugins if route else []) if p.name == name and p.enabled]
        scoped += [p for p in service.plugins if p.name == name and p.enabled]
        scoped += [p for p in self.plugins if p.name == name and p.enabled and (route and p.route == route.name)]
        scoped += [p for p in self.plugins if p.name == name and p.enabled and p.service == service.name]
        return scoped[0] if scoped else self.global_plugin(name)


def _unique(kind: str, names: list[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"{kind}: duplicate {n!r}")
        seen.add(n)


def placeholders(text: str) -> list[str]:
    """Every DECK_* variable the file refers to, in order of first use."""
    return list(dict.fromkeys(m.group("name") for m in PLACEHOLDER_RE.finditer(text)))


def render(text: str, environ: Mapping[str, str], defaults: Mapping[str, str] | None = None) -> str:
    """Substitute `${{ env "DECK_X" }}` from environ, then defaults; fail naming what is missing."""
    defaults = defaults or {}
    missing = [n for n in placeholders(text) if n not in environ and n not in defaults]
    if missing:
        raise KongConfigError(f"kong.yml: environment variable(s) not set: {', '.join(missing)}")

    def sub(m: re.Match[str]) -> str:
        name = m.group("name")
        return environ[name] if name in environ else defaults[name]

    return PLACEHOLDER_RE.sub(sub, text)


def _format(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        lines.append(f"{loc}: {err['msg']}")
    return "invalid kong.yml: " + "; ".join(lines)


def parse(text: str, environ: Mapping[str, str] | None = None, defaults: Mapping[str, str] | None = None) -> KongConfig:
    """Render placeholders, parse YAML and validate. Raises KongConfigError."""
    rendered = render(text, environ or {}, defaults)
    try:
        data = yaml.safe_load(rendered)
    except yaml.YAMLError as exc:
        raise KongConfigError(f"kong.yml: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise KongConfigError("kong.yml: top level must be a mapping")
    try:
        return KongConfig.model_validate(data)
    except ValidationError as exc:
        raise KongConfigError(_format(exc)) from None


def load(
    path: str | Path, environ: Mapping[str, str] | None = None, defaults: Mapping[str, str] | None = None
) -> KongConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise KongConfigError(f"{p}: cannot read ({exc.strerror})") from None
    return parse(text, environ, defaults)
