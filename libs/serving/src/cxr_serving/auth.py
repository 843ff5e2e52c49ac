"""Who may call: the peer address allow-list, then the API key and the role it holds (admin RPCs are
declared in the protos, read by `roles.is_admin_method`). Refusals are logged by `observability.refuse`."""

from __future__ import annotations

import hmac
import inspect
import ipaddress
import os
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from cxr_serving.errors import CxrError, ErrorKind, UnauthenticatedError
from cxr_serving.observability import log, rebuild_handler, refusal, refuse, request_metadata
from cxr_serving.roles import Role, is_admin_method

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Ctx = grpc.aio.ServicerContext[Any, Any]

API_KEY_HEADERS = ("x-api-key", "apikey")
FORWARDED_FOR_HEADER = "x-forwarded-for"


def api_key(md: dict[str, str]) -> str:
    """The key a caller sent, from either header Kong's key-auth plugin accepts."""
    return next((md[h] for h in API_KEY_HEADERS if h in md), "")


class ApiKeyStore:
    """Valid keys from config/env plus a secret file re-read when it changes (rotation without restart)."""

    def __init__(self, keys: Iterable[str] = (), key_file: Path | None = None, recheck_s: float = 1.0) -> None:
        self._static = [k for k in keys if k]
        self._file = key_file
        self._file_keys: list[str] = []
        self._mtime: float | None = None
        self._recheck_s = recheck_s
        self._checked = 0.0
        self._reload()

    def _reload(self) -> None:
        if self._file is None:
            return
        try:
            st = os.stat(self._file)
        except OSError:
            if self._mtime is not None:
                log.warning("api key file %s disappeared; keeping the last keys", self._file)
            return
        if st.st_mtime_ns != self._mtime:
            lines = self._file.read_text(encoding="utf-8").splitlines()
            self._file_keys = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
            self._mtime = st.st_mtime_ns
            log.info("loaded %d api key(s) from %s", len(self._file_keys), self._file)

    def keys(self) -> list[str]:
        now = time.monotonic()
        if self._file is not None and now - self._checked >= self._recheck_s:
            self._checked = now
            self._reload()
        return self._static + self._file_keys

    def is_valid(self, candidate: str) -> bool:
        ok = False
        cand = candidate.encode()
        for key in self.keys():  # compare against every key: time does not depend on which matched
            ok |= hmac.compare_digest(cand, key.encode())
        return ok


class KeyRoles:
    """The role an API key holds: an admin key (which may call every RPC) or an inference key."""

    def __init__(self, inference: ApiKeyStore, admin: ApiKeyStore | None = None) -> None:
        self.inference = inference
        self.admin = admin if admin is not None else ApiKeyStore()

    def role(self, key: str) -> Role:
        if not key:
            return Role.NONE
        # both stores are always compared, so the time taken does not tell which role a key holds
        is_admin, is_inference = self.admin.is_valid(key), self.inference.is_valid(key)
        return Role.ADMIN if is_admin else Role.INFERENCE if is_inference else Role.NONE

    def role_of(self, md: dict[str, str]) -> Role:
        """The role of the key in a call's metadata."""
        return self.role(api_key(md))


class AccessDeniedError(CxrError):
    """A caller authenticated (or not needing to) but not allowed this call: PERMISSION_DENIED."""

    kind = ErrorKind.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses calls without a valid `x-api-key` (or `apikey`) with UNAUTHENTICATED, and admin RPCs
    (`roles.is_admin_method`) called with an inference key with PERMISSION_DENIED `ADMIN_REQUIRED`."""

    def __init__(
        self,
        store: ApiKeyStore,
        exempt_methods: Iterable[str] = (),
        admin_store: ApiKeyStore | None = None,
        admin_method: Callable[[str], bool] = is_admin_method,
    ) -> None:
        self._roles = KeyRoles(store, admin_store)
        self._exempt = frozenset(exempt_methods)
        self._admin_method = admin_method

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]], details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None or method in self._exempt:
            return handler
        md = request_metadata(details)
        key = api_key(md)
        role = self._roles.role(key)
        if role is Role.ADMIN or (role is Role.INFERENCE and not self._admin_method(method)):
            return handler
        err: CxrError
        if role is Role.INFERENCE:
            err = AccessDeniedError(
                f"{method} is an admin RPC: call it with an admin API key (security.admin_api_keys)",
                reason="ADMIN_REQUIRED",
            )
        else:
            err = UnauthenticatedError(
                "missing API key: send it in the x-api-key header" if not key else "invalid API key",
                reason="API_KEY_MISSING" if not key else "API_KEY_INVALID",
            )
        return refusal(handler, method, md, err, role)


class AdminClosedInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """With security.enable_authentication false no caller can prove the admin role, so admin RPCs are refused
    with PERMISSION_DENIED `ADMIN_REQUIRED` rather than left open to whoever can connect."""

    def __init__(self, admin_method: Callable[[str], bool] = is_admin_method) -> None:
        self._admin_method = admin_method

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]], details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None or not self._admin_method(method):
            return handler
        err = AccessDeniedError(
            f"{method} is an admin RPC and security.enable_authentication is false: admin RPCs need "
            "authentication on and an admin API key",
            reason="ADMIN_REQUIRED",
        )
        return refusal(handler, method, request_metadata(details), err, Role.NONE)


def peer_address(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of a gRPC peer string (`ipv4:10.0.0.1:5000`, `ipv6:[::1]:5000`); None for other transports.
    An IPv4-mapped IPv6 address (a dual-stack listener) reads as its IPv4 address."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = urllib.parse.unquote(rest).rsplit(":", 1)[0].strip("[]").split("%", 1)[0]
    return _ip(host)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _within(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: Iterable[Network]) -> bool:
    return any(ip.version == n.version and ip in n for n in networks)


def forwarded_client(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, forwarded_for: Iterable[str], proxies: Iterable[Network]
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client behind the connection's peer ``ip``: the peer itself unless it is one of ``proxies`` (the
    gateways); then, from the right of X-Forwarded-For, the first address that is not a proxy."""
    proxies = list(proxies)
    if ip is None or not _within(ip, proxies):
        return ip
    hops = [h for value in forwarded_for for h in value.split(",") if h.strip()]
    for hop in reversed(hops):
        ip = _ip(hop)
        if ip is None or not _within(ip, proxies):
            return ip
    return ip


def client_ip(host: str, forwarded_for: Iterable[str], trusted_proxies: Iterable[str]) -> str:
    """`forwarded_client` for an HTTP peer's host and CIDR strings: the client's address as text, or ``host``
    when it is no IP address."""
    proxies = [ipaddress.ip_network(n, strict=False) for n in trusted_proxies]
    ip = forwarded_client(_ip(host), forwarded_for, proxies)
    return str(ip) if ip is not None else host


class PeerAllowListInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses calls from addresses outside `allowed` (CIDR blocks) with PERMISSION_DENIED `IP_NOT_ALLOWED`.
    The address is the connection's peer; only when that peer is one of `trusted_proxies` (the gateways)
    is `X-Forwarded-For` read: from its right, the first address that is not a trusted proxy is the client."""

    def __init__(
        self,
        allowed: Iterable[str],
        trusted_proxies: Iterable[str] = (),
        exempt_methods: Iterable[str] = (),
        key_roles: KeyRoles | None = None,
    ) -> None:
        self._allowed = [ipaddress.ip_network(n, strict=False) for n in allowed]
        self._proxies = [ipaddress.ip_network(n, strict=False) for n in trusted_proxies]
        self._exempt = frozenset(exempt_methods)
        self._roles = key_roles

    def client_address(
        self, peer: str, forwarded_for: Iterable[str] = ()
    ) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The caller's address, or None when it cannot be told (then the call is refused)."""
        return forwarded_client(peer_address(peer), forwarded_for, self._proxies)

    def allows(self, peer: str, forwarded_for: Iterable[str] = ()) -> bool:
        ip = self.client_address(peer, forwarded_for)
        return ip is not None and _within(ip, self._allowed)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]], details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None or method in self._exempt:
            return handler
        md = request_metadata(details)
        forwarded = [
            v
            for k, v in details.invocation_metadata or ()  # type: ignore[attr-defined]
            if k.lower() == FORWARDED_FOR_HEADER and isinstance(v, str)
        ]
        role = self._roles.role_of(md) if self._roles is not None else Role.NONE

        async def check(context: Ctx) -> None:
            peer = context.peer() or ""
            if not self.allows(peer, forwarded):
                client = self.client_address(peer, forwarded)
                err = AccessDeniedError(
                    f"calls from {client or peer or 'this address'} are not allowed (security.allowed_ips)",
                    reason="IP_NOT_ALLOWED",
                )
                await refuse(context, method, md, err, role)

        def wrap_unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            async def checked(request: Any, context: Ctx) -> Any:
                await check(context)
                result = behaviour(request, context)
                return await result if inspect.isawaitable(result) else result

            return checked

        def wrap_stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            async def checked(request: Any, context: Ctx) -> AsyncIterator[Any]:
                await check(context)
                result = behaviour(request, context)
                if inspect.isawaitable(result):
                    await result
                    return
                async for item in result:
                    yield item

            return checked

        return rebuild_handler(handler, wrap_unary, wrap_stream)
