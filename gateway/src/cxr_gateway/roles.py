"""Which RPCs are admin RPCs, and the consumer groups of kong.yml's acl plugin.

The list names RPCs, not routes: `admin_methods()` finds them in the descriptor set, so a new
service with a LoadModel is covered by name, and a test checks that every kong.yml route that
reaches one of them allows the admin group only.
"""

from __future__ import annotations

from cxr_gateway.routes import ProtoCatalog

# RPCs that change what the platform serves (weights, the literature index): admin keys only
ADMIN_RPC_NAMES = frozenset({"LoadModel", "UnloadModel", "IngestDocuments"})
ADMIN_GROUP = "admin"
INFERENCE_GROUP = "inference"


def is_admin_method(full_method: str) -> bool:
    """`/pkg.Service/Method` is an admin RPC (by its method name)."""
    return full_method.rsplit("/", 1)[-1] in ADMIN_RPC_NAMES


def admin_methods(catalog: ProtoCatalog) -> set[str]:
    """Every admin RPC of the cxr services in the descriptor set, as `/pkg.Service/Method`."""
    return {m for m, rpc in catalog.rpcs.items() if rpc.service.startswith("cxr.") and is_admin_method(m)}
