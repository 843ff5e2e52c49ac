"""Which Kong route a request hits, and which plugin instances apply to it."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cxr_gateway.kong_model import KongConfig, Route, Service
from cxr_gateway.limits import Acl, CorrelationId, KeyAuth, RateLimiter, SizeLimit

HTTP_PROTOCOLS = ("http", "https")
GRPC_PROTOCOLS = ("grpc", "grpcs")


@dataclass(frozen=True)
class RouteHit:
    service: Service
    route: Route


class Policies:
    """Routing plus one enforcement object per plugin instance (a global rate limit is shared)."""

    def __init__(self, kong: KongConfig, clock: Callable[[], float] = time.time) -> None:
        self.kong = kong
        self.clock = clock
        self._instances: dict[int, Any] = {}
        self._http: list[tuple[int, int, re.Pattern[str] | None, str, RouteHit]] = []
        self._grpc: list[tuple[str, RouteHit]] = []
        for svc in kong.services:
            if not svc.enabled:
                continue
            for r in svc.routes:
                hit = RouteHit(svc, r)
                for p in r.paths or []:
                    if any(x in HTTP_PROTOCOLS for x in r.protocols):
                        if p.startswith("~"):
                            self._http.append((0, r.regex_priority, re.compile(p[1:]), p, hit))
                        else:
                            self._http.append((1, len(p), None, p, hit))
                    if any(x in GRPC_PROTOCOLS for x in r.protocols):
                        self._grpc.append((p, hit))
        # Kong: regex paths by regex_priority, then prefix paths, longest first
        self._http.sort(key=lambda e: (e[0], -e[1]))
        self._grpc.sort(key=lambda e: -len(e[0]))
        g = kong.global_plugin("correlation-id")
        self.correlation: CorrelationId | None = CorrelationId(g.config) if g else None

    def match_http(self, method: str, path: str) -> RouteHit | None:
        for _kind, _prio, regex, prefix, hit in self._http:
            if hit.route.methods and method not in hit.route.methods:
                continue
            if regex is not None:
                if regex.match(path):
                    return hit
            elif path.startswith(prefix):
                return hit
        return None

    def match_grpc(self, method: str) -> RouteHit | None:
        for prefix, hit in self._grpc:
            if method.startswith(prefix):
                return hit
        return None

    def _instance(self, name: str, hit: RouteHit, factory: Callable[[Any], Any]) -> Any:
        plugin = self.kong.plugin_for(name, hit.service, hit.route)
        if plugin is None:
            return None
        key = id(plugin)
        if key not in self._instances:
            self._instances[key] = factory(plugin)
        return self._instances[key]

    def key_auth(self, hit: RouteHit) -> KeyAuth | None:
        return self._instance("key-auth", hit, lambda p: KeyAuth(p.config, self.kong.consumers))  # type: ignore[no-any-return]

    def acl(self, hit: RouteHit) -> Acl | None:
        return self._instance("acl", hit, lambda p: Acl(p.config))  # type: ignore[no-any-return]

    def size_limit(self, hit: RouteHit) -> SizeLimit | None:
        return self._instance("request-size-limiting", hit, lambda p: SizeLimit(p.config))  # type: ignore[no-any-return]

    def rate_limiter(self, hit: RouteHit) -> RateLimiter | None:
        return self._instance("rate-limiting", hit, lambda p: RateLimiter(p.config, self.clock))  # type: ignore[no-any-return]

    def grpc_gateway_proto(self, hit: RouteHit) -> str | None:
        plugin = self.kong.plugin_for("grpc-gateway", hit.service, hit.route)
        return plugin.config.proto if plugin is not None else None
