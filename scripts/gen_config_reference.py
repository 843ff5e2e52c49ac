"""Regenerate the tables of docs/configuration.md from the pydantic models of the config file
(cxr_serving.settings, and each service's `models.*` schema), or check they are current.

    python scripts/gen_config_reference.py          # rewrite the tables
    python scripts/gen_config_reference.py --check  # exit 1 when docs/configuration.md is stale

Everything between the two markers is generated: every key with its type, default, the
`Field(description=...)` text and the environment variable that overrides it. The text outside
the markers is written by hand.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from cxr_serving import settings as settings_module
from cxr_serving.catalog import load_catalog

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
START, END = "<!-- reference:start -->", "<!-- reference:end -->"
# Each catalog service's `models.*` schemas live in `<package>.config` (a service without models has none):
# every pydantic model defined there is documented.
CONFIG_MODULE = "config"
PLACEHOLDER = "<name>"


@dataclass(frozen=True)
class Row:
    path: tuple[str, ...]
    type: str
    default: str
    description: str
    env: str


def _type_name(annotation: Any) -> str:
    """A short, readable form of a field's type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]"
    if isinstance(annotation, type):
        return "path" if issubclass(annotation, Path) else annotation.__name__
    return str(annotation)


def _section_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(model, keyed): the pydantic model a field holds directly, or as the values of a dict (keyed)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is dict:
        value = typing.get_args(annotation)[1]
        if isinstance(value, type) and issubclass(value, BaseModel):
            return value, True
    return None, False


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, dict):
        value = {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in value.items()}
    text = json.dumps(value, default=str, separators=(", ", ": "))
    return "`" + text.replace("|", "\\|") + "`"


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|").replace("<", "&lt;")


def env_variables() -> dict[tuple[str, ...], list[str]]:
    """Every variable that is not of the generic `CXR_<SECTION>__<KEY>` form, by the key it sets."""
    out: dict[tuple[str, ...], list[str]] = {}
    flat: dict[str, tuple[str, ...]] = {
        **settings_module._FLAT_ENV,
        **getattr(settings_module, "_VECTOR_DB_ENV", {}),
    }
    for var, path in flat.items():
        out.setdefault(path, []).append(var)
    rag = importlib.import_module("cxr_rag.config")
    for var, key in getattr(rag, "_SHORT_ENV", {}).items():  # applied to models.rag.llm by rag_config()
        out.setdefault(("models", "rag", "llm", key), []).append(var)
    return out


def generic_env(path: tuple[str, ...]) -> str | None:
    """The `CXR_<SECTION>__<KEY>` variable of a key: only keys below a section have one."""
    if len(path) < 2:
        return None
    return "CXR_" + "__".join(p.upper() for p in path)


def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], type[BaseModel], Row]]:
    """Each field of `model` and of the models below it, depth first: (section path, section model, row)."""
    special = env_variables()
    nested: list[tuple[tuple[str, ...], type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        sub, keyed = _section_model(field.annotation)
        envs = [f"`{v}`" for v in special.get(path, [])]
        generic = generic_env((*path, PLACEHOLDER) if keyed else path) if sub is None or keyed else None
        if generic:
            envs.insert(0, f"`{generic}{'__<KEY>' if keyed else ''}`")
        yield (
            prefix,
            model,
            Row(path, _type_name(field.annotation), _default(field), _cell(field.description), ", ".join(envs)),
        )
        if sub is not None:
            nested.append(((*path, PLACEHOLDER) if keyed else path, sub))
    for path, sub in nested:
        yield from walk(sub, path)


def _doc(model: type[BaseModel]) -> str:
    """First paragraph of a model's own docstring (pydantic's BaseModel docstring is not inherited)."""
    text = model.__dict__.get("__doc__") or ""
    return " ".join(inspect.cleandoc(text).split("\n\n")[0].split())


def _table(rows: list[Row], key_of: Any, with_env: bool) -> list[str]:
    head = "| key | type | default | description |" + (" environment |" if with_env else "")
    out = [head, "|---|---|---|---|" + ("---|" if with_env else "")]
    for r in rows:
        line = f"| `{key_of(r)}` | {r.type} | {r.default} | {r.description} |"
        out.append(line + (f" {r.env} |" if with_env else ""))
    return out


def settings_rows() -> list[Row]:
    return [row for _, _, row in walk(settings_module.Settings, ())]


def _settings_sections() -> list[str]:
    sections: dict[tuple[str, ...], tuple[type[BaseModel], list[Row]]] = {}
    for prefix, model, row in walk(settings_module.Settings, ()):
        sections.setdefault(prefix, (model, []))[1].append(row)
    out: list[str] = []
    for prefix, (model, rows) in sections.items():
        title = ".".join(prefix) or "top level"
        out += ["", f"### `{title}`" if prefix else f"### {title}", ""]
        if prefix and _doc(model):
            out += [_doc(model), ""]
        out += _table(rows, lambda r: ".".join(r.path), with_env=True)
    return out


def model_schema_modules() -> tuple[str, ...]:
    """`<package>.config` of every service in the catalog, in catalog order, so a new service's schemas are
    documented without editing this script; a catalog service that is not installed is an error, not a gap."""
    modules = []
    for spec in load_catalog().values():
        if not spec.installed():
            raise SystemExit(f"service '{spec.name}': {spec.package} is not installed, so its config cannot be read")
        name = f"{spec.package}.{CONFIG_MODULE}"
        if importlib.util.find_spec(name) is not None:
            modules.append(name)
    return tuple(modules)


def model_schemas() -> list[tuple[str, type[BaseModel]]]:
    """(module, model) for every pydantic model with fields defined in a service's config module, in source order."""
    found: list[tuple[str, int, type[BaseModel]]] = []
    schema_modules = model_schema_modules()
    for name in schema_modules:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, BaseModel)
                and obj.__module__ == name
                and obj.model_fields
                and not obj.__name__.startswith("_")
            ):
                found.append((name, inspect.getsourcelines(obj)[1], obj))
    order = {name: i for i, name in enumerate(schema_modules)}
    found.sort(key=lambda t: (order[t[0]], t[1]))
    return [(module, model) for module, _, model in found]


def _schema_fields(model: type[BaseModel]) -> tuple[type[BaseModel] | None, list[str]]:
    """(documented base, field names to list): a subclass of another documented schema lists only its own fields."""
    for base in model.__mro__[1:]:
        if isinstance(base, type) and issubclass(base, BaseModel) and base.model_fields and base is not BaseModel:
            if not base.__name__.startswith("_"):
                own = [n for n in model.model_fields if n in inspect.get_annotations(model)]
                return base, own
    return None, list(model.model_fields)


def _model_sections() -> list[str]:
    special = env_variables()
    out: list[str] = []
    for module, model in model_schemas():
        base, names = _schema_fields(model)
        out += ["", f"### `{model.__name__}` ({module})", ""]
        if _doc(model):
            out += [_doc(model), ""]
        if base is not None:
            out += [f"The keys of `{base.__name__}`, with these changes:", ""]
        rows = []
        for name in names:
            field = model.model_fields[name]
            envs = [v for path, vs in special.items() if path[-1] == name and _sets(path, module, model) for v in vs]
            rows.append(
                Row(
                    (name,),
                    _type_name(field.annotation),
                    _default(field),
                    _cell(field.description),
                    ", ".join(f"`{v}`" for v in envs),
                )
            )
        out += _table(rows, lambda r: r.path[0], with_env=any(r.env for r in rows))
    return out


def _sets(path: tuple[str, ...], module: str, model: type[BaseModel]) -> bool:
    """Whether a key path `models.<service>[.<part>].<key>` is a key of `model` (a schema of `module`)."""
    if len(path) < 3 or path[0] != "models" or module != f"cxr_{path[1]}.config":
        return False
    return _holder(module, path[2:-1]) is model


def _holder(module: str, inner: tuple[str, ...]) -> type[BaseModel] | None:
    """The schema of `models.<service>` (the module's model no other model of it holds), then down `inner`."""
    schemas = [m for mod, m in model_schemas() if mod == module]
    held = {_section_model(f.annotation)[0] for m in schemas for f in m.model_fields.values()}
    roots = [m for m in schemas if m not in held]
    if len(roots) != 1:
        return None
    node: type[BaseModel] | None = roots[0]
    for key in inner:
        if node is None or key not in node.model_fields:
            return None
        node = _section_model(node.model_fields[key].annotation)[0]
    return node


def _refused_keys() -> list[str]:
    out = [
        "",
        "### Refused keys",
        "",
        "Keys of the deployment guide's config that the services refuse at start, whatever their value:",
        "",
    ]
    for (section, key), why in settings_module._GUIDE_ONLY_KEYS.items():
        out.append(f"- `{section}.{key}`: {_cell(why)}.")
    return out


def reference() -> str:
    lines = ["", "## Settings (`cxr_serving.settings`)"]
    lines += _settings_sections()
    lines += _refused_keys()
    lines += [
        "",
        "## Model schemas",
        "",
        "Each entry of `models` is validated by its service's own schema; every key of one is also reachable",
        "as `CXR_MODELS__<MODEL>__<KEY>` (e.g. `CXR_MODELS__RAG__TOP_K=8`).",
    ]
    lines += _model_sections()
    return "\n".join(lines).strip() + "\n"


def render(doc: str) -> str:
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{reference()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when the file is stale, write nothing")
    ap.add_argument("--path", type=Path, default=DOC, help="the reference to write or check (default: %(default)s)")
    args = ap.parse_args(argv)
    doc = args.path.read_text()
    fresh = render(doc)
    if args.check:
        if fresh != doc:
            print(f"{args.path} is stale: run python scripts/gen_config_reference.py", file=sys.stderr)
            return 1
        return 0
    args.path.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
