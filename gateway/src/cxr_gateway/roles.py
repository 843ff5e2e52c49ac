"""Which RPCs are admin RPCs, and the consumer groups of kong.yml's acl plugin.

The protos declare the admin surface with the method option `(cxr.common.v1.access) =
ACCESS_ADMIN`; `admin_methods()` reads it from the descriptor set (by name, without importing
generated code), falling back to the RPC names below for a descriptor set that predates the
option. `unprotected_admin_routes()` is the check that kong.yml lets only the admin group reach
them: `--check` and start-up run it, and so does the test suite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from google.protobuf.unknown_fields import UnknownFieldSet

from cxr_gateway.routes import ProtoCatalog

if TYPE_CHECKING:
    from cxr_gateway.kong_model import KongConfig

# RPCs that change what the platform serves (weights, routing, cards, the literature index, the DICOM node's
# dead letters): admin keys only. The fallback for a descriptor set without the access option; a unit test
# keeps it equal to the RPCs the protos mark ACCESS_ADMIN.
ADMIN_RPC_NAMES = frozenset(
    {
        "LoadModel",
        "UnloadModel",
        "RecordModelEvaluation",
        "PromoteModel",
        "RollbackModel",
        "SetModelRouting",
        "IngestDocuments",
        "RetryDeadLetter",
    }
)
ADMIN_GROUP = "admin"
INFERENCE_GROUP = "inference"
ACCESS_OPTION = "cxr.common.v1.access"
ACCESS_ENUM = "cxr.common.v1.Access"


def _option_value(options: Any, number: int) -> int | None:
    """An enum-valued extension of MethodOptions: known (its module imported) or an unknown field."""
    for fd, value in options.ListFields():
        if fd.is_extension and fd.number == number:
            return int(value)
    unknown = UnknownFieldSet(options)
    for f in (unknown[i] for i in range(len(unknown))):
        if f.field_number == number and f.wire_type == 0:
            return int(f.data)
    return None


def admin_methods(catalog: ProtoCatalog) -> set[str]:
    """Every admin RPC of the cxr services in the descriptor set, as `/pkg.Service/Method`."""
    cxr = {m: rpc for m, rpc in catalog.rpcs.items() if rpc.service.startswith("cxr.")}
    try:
        number = catalog.pool.FindExtensionByName(ACCESS_OPTION).number
        admin = catalog.pool.FindEnumTypeByName(ACCESS_ENUM).values_by_name["ACCESS_ADMIN"].number
    except KeyError:
        return {m for m, rpc in cxr.items() if rpc.name in ADMIN_RPC_NAMES}
    out = set()
    for m, rpc in cxr.items():
        options = catalog.pool.FindMethodByName(f"{rpc.service}.{rpc.name}").GetOptions()
        if _option_value(options, number) == admin:
            out.add(m)
    return out


def unprotected_admin_routes(kong: KongConfig, catalog: ProtoCatalog) -> list[str]:
    """`method via route` for each way (gRPC or a REST binding) to reach an admin RPC through a route
    whose acl does not allow the admin group alone; empty when kong.yml protects every admin RPC."""
    from cxr_gateway.policies import Policies

    policies = Policies(kong)
    problems = []
    for method in sorted(admin_methods(catalog)):
        rpc = catalog.rpcs[method]
        hits = [policies.match_grpc(method)] + [
            policies.match_http(b.method, b.template.example()) for b in rpc.bindings
        ]
        for hit in hits:
            if hit is None:
                continue  # not routed at all: unreachable through the gateway
            acl = policies.acl(hit)
            if acl is None or acl.config.allow is None or set(acl.config.allow) != {ADMIN_GROUP}:
                problems.append(f"{method} via route {hit.route.name}")
    return problems
