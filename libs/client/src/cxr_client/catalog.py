"""The services the client knows: the platform's catalog plus extra catalog files.

`services.json` here is a generated copy of cxr_serving's catalog (`scripts/gen_catalog.py`; lint
fails when it is stale), because the client installs without the serving runtime. Extra files of
the same shape come from `CXR_SERVICE_CATALOG` (paths separated by `os.pathsep`), as for the
services, so a service registered there is reachable by name with its default port and retry policy.
The client reads only the fields it needs; the services validate the whole entry at start.
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


def _entries(data: Any, source: str) -> list[ServiceEntry]:
    try:
        return [
            ServiceEntry(
                name=str(e["name"]),
                grpc_services=tuple(str(g) for g in e["grpc_services"]),
                port=int(e["port"]),
                model_admin=bool(e["model_admin"]),
                idempotent=bool(e["idempotent"]),
            )
            for e in data["services"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"service catalog {source}: not a catalog file ({type(exc).__name__}: {exc})") from None


@functools.cache
def load(extra: tuple[Path, ...] = ()) -> dict[str, ServiceEntry]:
    """The built-in services, then each extra file's, by name; a name defined twice is an error."""
    builtin = json.loads(resources.files("cxr_client").joinpath("services.json").read_text(encoding="utf-8"))
    out: dict[str, ServiceEntry] = {}
    docs = [(builtin, "cxr_client/services.json")]
    docs += [(json.loads(p.read_text(encoding="utf-8")), str(p)) for p in extra]
    for data, source in docs:
        for entry in _entries(data, source):
            if entry.name in out:
                raise ValueError(f"service catalog {source}: service '{entry.name}' is already defined")
            out[entry.name] = entry
    return out
