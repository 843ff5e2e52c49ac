"""Which RPCs need an admin key: read from the `(cxr.common.v1.access)` method option in the protos,
the one declaration of the admin surface (services here, the gateway from its descriptor set)."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Iterable
from enum import StrEnum

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from cxr_protos.common.v1 import access_pb2
from cxr_serving.catalog import load_catalog
from cxr_serving.errors import ConfigError


class Role(StrEnum):
    """The role a caller's key holds (recorded in the audit line)."""

    ADMIN = "admin"
    INFERENCE = "inference"
    NONE = "none"


def is_admin(method: MethodDescriptor) -> bool:
    """True when the method is declared `option (cxr.common.v1.access) = ACCESS_ADMIN`."""
    access: int = method.GetOptions().Extensions[access_pb2.access]  # type: ignore[index]  # untyped stub
    return bool(access == access_pb2.ACCESS_ADMIN)


def full_method_name(method: MethodDescriptor) -> str:
    """The gRPC path of a method: `/package.Service/Method`."""
    return f"/{method.containing_service.full_name}/{method.name}"


def admin_methods(services: Iterable[ServiceDescriptor]) -> frozenset[str]:
    """The gRPC paths of the admin methods of these services (e.g. for a gateway's ACL)."""
    return frozenset(full_method_name(m) for s in services for m in s.methods if is_admin(m))


@functools.lru_cache(maxsize=1024)
def is_admin_method(path: str) -> bool:
    """`/package.Service/Method` needs an admin key. Looks the method up in the default descriptor pool,
    where every servicer's generated module has registered it; an unknown method is not an admin one."""
    service, _, name = path.lstrip("/").partition("/")
    try:
        method = descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    except KeyError:
        return False
    return is_admin(method)


def import_generated_modules() -> None:
    """Import every generated `*_pb2` module of cxr_protos, which registers its services in the default pool."""
    import cxr_protos

    for info in pkgutil.walk_packages(cxr_protos.__path__, "cxr_protos."):
        if info.name.endswith("_pb2"):
            importlib.import_module(info.name)


@functools.cache
def platform_admin_methods() -> frozenset[str]:
    """The admin methods of every service in the built-in catalog, so settings can be checked before any
    servicer is loaded; the services' descriptors come from cxr_protos, whose modules are all imported."""
    import_generated_modules()
    pool = descriptor_pool.Default()
    services = []
    for spec in load_catalog().values():
        for name in spec.grpc_services:
            try:
                services.append(pool.FindServiceByName(name))
            except KeyError:
                raise ConfigError(
                    f"service catalog {spec.source}: {spec.name}.grpc_services: {name} is not defined by any "
                    "cxr_protos module (run scripts/generate_protos.py)"
                ) from None
    return admin_methods(services)
