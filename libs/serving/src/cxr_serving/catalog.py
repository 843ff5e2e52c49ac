"""The service catalog: which services exist, their gRPC names, default ports and entry points.

The platform's services are data (`services.json` in this package), so settings, the local runner,
the local gateway, the chart and the alerts read one list instead of each hard-coding three names.
A service outside this repository is added by naming an extra catalog file of the same shape in the
`service_catalog` setting (`CXR_SERVICE_CATALOG`, paths separated by `os.pathsep`): no product code
changes. The client reads a generated copy (`cxr_client/services.json`, kept in step by
`scripts/gen_catalog.py --check`) because it does not depend on this package.

Each entry: `name` (lower-case, picks `services.<name>` in the config and `DECK_<NAME>_*` in
kong.yml), `package` (the import package, whose absence means "not installed"), `binding`
(`module:function` taking Settings and returning a ServiceBinding), `grpc_services` (full names),
`port` and `metrics_port` (defaults of `services.<name>`), `model_admin` (serves
ListModels/LoadModel/UnloadModel from checkpoints, so it gets the model weights volume) and
`idempotent` (every RPC is safe to replay, so the client retries it on UNAVAILABLE).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr_serving.errors import ConfigError

if TYPE_CHECKING:
    from cxr_serving.server import ServiceBinding
    from cxr_serving.settings import Settings

ENV_VAR = "CXR_SERVICE_CATALOG"
BUILTIN = "services.json"
# A name becomes part of Kubernetes object names (`<release>-cxr-<name>`, a DNS label) and an env var
# prefix, so letters and digits only; 31 characters leave room for the release prefix within 63.
_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,30}$")
# The chart reads each service's values from the top-level `<name>:` block, so a service may not take
# the name of another top-level key of deploy/helm/cxr/values.yaml (tests/unit keeps this list in step).
RESERVED_NAMES = frozenset(
    {
        "global",
        "nameOverride",
        "fullnameOverride",
        "commonLabels",
        "commonAnnotations",
        "config",
        "apiKeys",
        "adminApiKeys",
        "backendTls",
        "weights",
        "serviceDefaults",
        "vllm",
        "chroma",
        "kong",
        "networkPolicy",
        "prometheusRule",
        "evaluate",
    }
)
_DOTTED_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_FIELDS = {
    "name": str,
    "package": str,
    "binding": str,
    "grpc_services": list,
    "port": int,
    "metrics_port": int,
    "model_admin": bool,
    "idempotent": bool,
}


@dataclass(frozen=True)
class ServiceSpec:
    """One catalog entry (see the module docstring for each field)."""

    name: str
    package: str
    binding: str
    grpc_services: tuple[str, ...]
    port: int
    metrics_port: int
    model_admin: bool
    idempotent: bool
    source: str  # the catalog file it came from, for error messages

    def installed(self) -> bool:
        """Whether the service's package can be imported here (the local runner skips the others)."""
        return importlib.util.find_spec(self.package) is not None

    def load_binding(self) -> Callable[[Settings], ServiceBinding]:
        """Import the `module:function` that builds the service's ServiceBinding."""
        module, _, attr = self.binding.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"service catalog {self.source}: {self.name}.binding {self.binding!r}: {exc}") from None
        if not callable(fn):
            raise ConfigError(f"service catalog {self.source}: {self.name}.binding {self.binding!r} is not callable")
        return fn  # type: ignore[no-any-return]


class Catalog(Mapping[str, ServiceSpec]):
    """The services by name, in catalog order (built-in first, then each extra file's)."""

    def __init__(self, specs: Iterable[ServiceSpec]) -> None:
        self._specs: dict[str, ServiceSpec] = {}
        for spec in specs:
            self._add(spec)

    def _add(self, spec: ServiceSpec) -> None:
        def clash(what: str, other: ServiceSpec) -> ConfigError:
            return ConfigError(
                f"service catalog {spec.source}: {spec.name}.{what} is already used by service "
                f"'{other.name}' ({other.source})"
            )

        for other in self._specs.values():
            if other.name == spec.name:
                raise clash("name", other)
            for port in (spec.port, spec.metrics_port):
                if port in (other.port, other.metrics_port):
                    raise clash("port" if port == spec.port else "metrics_port", other)
            if set(spec.grpc_services) & set(other.grpc_services):
                raise clash("grpc_services", other)
        self._specs[spec.name] = spec

    def __getitem__(self, name: str) -> ServiceSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise ConfigError(
                f"unknown service '{name}': the service catalog has {sorted(self._specs)} "
                f"(add one with an extra catalog file in {ENV_VAR} / service_catalog)"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def to_json(self) -> dict[str, Any]:
        """The catalog in its file shape (what scripts/gen_catalog.py copies for the client)."""
        return {"services": [_entry_json(s) for s in self._specs.values()]}


def _entry_json(s: ServiceSpec) -> dict[str, Any]:
    return {
        "name": s.name,
        "package": s.package,
        "binding": s.binding,
        "grpc_services": list(s.grpc_services),
        "port": s.port,
        "metrics_port": s.metrics_port,
        "model_admin": s.model_admin,
        "idempotent": s.idempotent,
    }


def parse(data: Any, source: str) -> list[ServiceSpec]:
    """Validate one catalog document; ConfigError names the file, the entry and the field."""
    if not isinstance(data, dict) or set(data) != {"services"} or not isinstance(data["services"], list):
        raise ConfigError(f"service catalog {source}: must be a JSON object with one key, 'services' (a list)")
    out = []
    for i, entry in enumerate(data["services"]):
        where = f"service catalog {source}: services[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be an object")
        missing, extra = sorted(set(_FIELDS) - set(entry)), sorted(set(entry) - set(_FIELDS))
        if missing or extra:
            raise ConfigError(f"{where}: missing keys {missing}, unknown keys {extra}")
        for key, typ in _FIELDS.items():
            value = entry[key]
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                raise ConfigError(f"{where}.{key}: must be a {typ.__name__}, got {value!r}")
        name = entry["name"]
        if not _NAME_RE.match(name):
            raise ConfigError(
                f"{where}.name: {name!r} must be lower-case letters and digits, starting with a letter, at most "
                "31 characters (it is part of Kubernetes object names and env var names)"
            )
        if name in RESERVED_NAMES:
            raise ConfigError(
                f"{where}.name: {name!r} is reserved: the Helm chart's values already use the top-level key "
                f"'{name}' for something else"
            )
        module, sep, attr = entry["binding"].partition(":")
        if not sep or not _DOTTED_RE.match(module) or not attr.isidentifier():
            raise ConfigError(f"{where}.binding: {entry['binding']!r} must be 'package.module:function'")
        if not _DOTTED_RE.match(entry["package"]):
            raise ConfigError(f"{where}.package: {entry['package']!r} is not an importable package name")
        grpc = entry["grpc_services"]
        if not grpc or not all(isinstance(g, str) and _DOTTED_RE.match(g) and "." in g for g in grpc):
            raise ConfigError(f"{where}.grpc_services: must list full service names (e.g. 'pkg.v1.FooService')")
        for key in ("port", "metrics_port"):
            if not 1 <= entry[key] <= 65535:
                raise ConfigError(f"{where}.{key}: {entry[key]} is not a port (1-65535)")
        if entry["port"] == entry["metrics_port"]:
            raise ConfigError(f"{where}: port and metrics_port are both {entry['port']}")
        out.append(
            ServiceSpec(
                name=name,
                package=entry["package"],
                binding=entry["binding"],
                grpc_services=tuple(grpc),
                port=entry["port"],
                metrics_port=entry["metrics_port"],
                model_admin=entry["model_admin"],
                idempotent=entry["idempotent"],
                source=source,
            )
        )
    return out


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"service catalog {path}: cannot read ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"service catalog {path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None


def builtin_specs() -> list[ServiceSpec]:
    """The platform's own services, from the file shipped in this package."""
    text = resources.files("cxr_serving").joinpath(BUILTIN).read_text(encoding="utf-8")
    return parse(json.loads(text), f"cxr_serving/{BUILTIN}")


def load_catalog(extra: Iterable[str | Path] = ()) -> Catalog:
    """The built-in services plus those of each extra catalog file, validated as one list."""
    specs = builtin_specs()
    for path in extra:
        specs.extend(parse(_read(Path(path)), str(path)))
    return Catalog(specs)
