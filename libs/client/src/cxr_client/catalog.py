"""The services the client knows: the platform's catalog plus extra catalog files.

`services.json` here is a generated copy of cxr_serving's catalog (`scripts/gen_catalog.py`; lint
fails when it is stale), because the client installs without the serving runtime. Extra files of
the same shape come from `CXR_SERVICE_CATALOG` (paths separated by `os.pathsep`), as for the
services, so a service registered there is reachable by name with its default port and retry policy.
The client reads and type-checks only the fields it needs (a file it cannot use raises CatalogError
naming the file and the field); the services validate the whole entry at start.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

ENV_VAR = "CXR_SERVICE_CATALOG"


@dataclass(frozen=True)
class ServiceEntry:
    """What the client needs of one catalog entry."""

    name: str
    grpc_services: tuple[str, ...]
    port: int
    model_admin: bool
    idempotent: bool  # every RPC may be replayed: the retry policy covers it


def paths_from_env(environ: Mapping[str, str]) -> tuple[Path, ...]:
    return tuple(Path(p) for p in environ.get(ENV_VAR, "").split(os.pathsep) if p.strip())


class CatalogError(ValueError):
    """A service catalog the client cannot use; the message names the file, the entry and the field
    (and CXR_SERVICE_CATALOG for an extra file), so the CLI reports it as a usage error."""


_FIELDS: dict[str, type] = {"name": str, "grpc_services": list, "port": int, "model_admin": bool, "idempotent": bool}


def _entry(e: Any, where: str) -> ServiceEntry:
    if not isinstance(e, dict):
        raise CatalogError(f"{where}: must be an object")
    for key, typ in _FIELDS.items():
        if key not in e:
            raise CatalogError(f"{where}: missing key '{key}'")
        if not isinstance(e[key], typ) or (typ is int and isinstance(e[key], bool)):
            raise CatalogError(f"{where}.{key}: must be a {typ.__name__}, got {e[key]!r}")
    if not e["name"]:
        raise CatalogError(f"{where}.name: must not be empty")
    if not e["grpc_services"] or not all(isinstance(g, str) and "." in g for g in e["grpc_services"]):
        raise CatalogError(f"{where}.grpc_services: must list full service names (e.g. 'pkg.v1.FooService')")
    if not 1 <= e["port"] <= 65535:
        raise CatalogError(f"{where}.port: {e['port']} is not a port (1-65535)")
    return ServiceEntry(
        name=e["name"],
        grpc_services=tuple(e["grpc_services"]),
        port=e["port"],
        model_admin=e["model_admin"],
        idempotent=e["idempotent"],
    )


def _entries(data: Any, source: str) -> list[ServiceEntry]:
    if not isinstance(data, dict) or not isinstance(data.get("services"), list):
        raise CatalogError(f"{source}: must be a JSON object whose 'services' is a list")
    return [_entry(e, f"{source}: services[{i}]") for i, e in enumerate(data["services"])]


def _read(path: Path, source: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"{source}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CatalogError(f"{source}: not valid JSON ({exc})") from None


@functools.cache
def load(extra: tuple[Path, ...] = ()) -> dict[str, ServiceEntry]:
    """The built-in services, then each extra file's, by name; a name defined twice is an error."""
    builtin = json.loads(resources.files("cxr_client").joinpath("services.json").read_text(encoding="utf-8"))
    out: dict[str, ServiceEntry] = {}
    docs = [(builtin, "service catalog cxr_client/services.json")]
    for p in extra:
        source = f"service catalog {p} ({ENV_VAR})"
        docs.append((_read(p, source), source))
    for data, source in docs:
        for entry in _entries(data, source):
            if entry.name in out:
                raise CatalogError(f"{source}: service '{entry.name}' is already defined")
            out[entry.name] = entry
    return out
