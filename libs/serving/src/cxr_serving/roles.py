"""Which RPCs need an admin key: read from the `(cxr.common.v1.access)` method option in the protos,
the one declaration of the admin surface (services here, the gateway from its descriptor set)."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from enum import StrEnum

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from cxr_protos.common.v1 import access_pb2


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


@functools.cache
def platform_admin_methods() -> frozenset[str]:
    """The admin methods of every cxr service; importing their generated modules registers them in the
    default pool, so settings can be checked before any servicer is loaded."""
    from cxr_protos.classification.v1 import classification_service_pb2
    from cxr_protos.dicom.v1 import dicom_service_pb2
    from cxr_protos.rag.v1 import rag_service_pb2
    from cxr_protos.segmentation.v1 import segmentation_service_pb2

    modules = (classification_service_pb2, segmentation_service_pb2, rag_service_pb2, dicom_service_pb2)
    return admin_methods(s for m in modules for s in m.DESCRIPTOR.services_by_name.values())
