"""Which settings keys no code reads: a walk over the settings schemas matched against the code's AST.

A key counts as read only where code reads it: an attribute load `<expr>.<key>` or a string key used as a
subscript (`d["key"]`) or as the first argument of `.get`/`.pop`/`getattr`. Docstrings, comments and
other strings never count. A schema's own module counts only through its functions and properties that
code in the consumer scope calls by name (validators are not called by name, so they never count).
Names that many unrelated objects share (`enabled`, `device`, `host`...) must be read on a named receiver
in a named file, so a same-named attribute elsewhere cannot stand in for the key.
"""

from __future__ import annotations

import ast
import inspect
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel


@dataclass(frozen=True)
class Schema:
    """A settings model, the dotted prefix of its keys, and the source files that consume it."""

    model: type[BaseModel]
    prefix: str
    scope: tuple[Path, ...]


def _models_in(annotation: typing.Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def schema_keys(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, type[BaseModel]]]:
    """(dotted path, field name, owning model) of every field of every nested model, recursively."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path, name, model
        for sub in _models_in(field.annotation):
            yield from schema_keys(sub, f"{path}.")


def _key_string(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def reads(tree: ast.AST) -> Iterator[tuple[str, ast.expr]]:
    """(key, receiver) of every read in `tree`: attribute loads and string subscript/get keys."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            yield node.attr, node.value
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            key = _key_string(node.slice)
            if key is not None:
                yield key, node.value
        elif isinstance(node, ast.Call) and node.args:
            key = _key_string(node.args[0])
            func = node.func
            if key is None:
                continue
            if isinstance(func, ast.Attribute) and func.attr in ("get", "pop"):
                yield key, func.value
            elif isinstance(func, ast.Name) and func.id == "getattr" and len(node.args) >= 2:
                key = _key_string(node.args[1])
                if key is not None:
                    yield key, node.args[0]


def _reads_in(tree: ast.AST, function: str) -> Iterator[tuple[str, ast.expr]]:
    if not function:
        yield from reads(tree)
        return
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and fn.name == function:
            yield from reads(fn)


def _names_used(tree: ast.AST) -> set[str]:
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
    }


def _files(scope: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in scope:
        files = [p] if p.is_file() else sorted(p.rglob("*.py"))
        out += [f for f in files if "_pb2" not in f.name and "/tests/" not in str(f)]
    return out


def unread_keys(
    schemas: Iterable[Schema], readers: Mapping[str, Iterable[tuple[Path, str, str]]], generic: Iterable[str]
) -> list[str]:
    """Dotted paths of keys that no code in their schema's scope reads.

    `generic` names count only through `readers[path]`: (file, receiver, function) triples, the receiver
    being the source text the key is read on (`settings.server_config` for `settings.server_config.device`)
    and the function, when not empty, the one the read must be in.
    """
    generic = set(generic)
    trees: dict[Path, ast.AST] = {}
    keys_read: dict[Path, set[str]] = {}
    names: dict[Path, set[str]] = {}

    def tree(p: Path) -> ast.AST:
        if p not in trees:
            trees[p] = ast.parse(p.read_text(encoding="utf-8"))
        return trees[p]

    def read_in(p: Path) -> set[str]:
        if p not in keys_read:
            keys_read[p] = {key for key, _ in reads(tree(p))}
        return keys_read[p]

    def used_in(p: Path) -> set[str]:
        if p not in names:
            names[p] = _names_used(tree(p))
        return names[p]

    unread: list[str] = []
    for schema in schemas:
        keys = list(schema_keys(schema.model, schema.prefix))
        defining = {
            Path(inspect.getfile(c)).resolve()
            for _, _, m in keys
            for c in m.__mro__
            if isinstance(c, type) and issubclass(c, BaseModel) and c is not BaseModel
        }
        consumers = [f for f in _files(schema.scope) if f.resolve() not in defining]
        used = set().union(*(used_in(f) for f in consumers)) if consumers else set()
        found = set().union(*(read_in(f) for f in consumers)) if consumers else set()
        for mod in defining:  # the schema's own functions and properties, when consumers call them
            for fn in ast.walk(tree(mod)):
                if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and fn.name in used:
                    found |= {key for key, _ in reads(fn)}
        for path, name, _ in keys:
            if name in generic:
                ok = any(
                    key == name and ast.unparse(recv) == want
                    for f, want, function in readers.get(path, ())
                    for key, recv in _reads_in(tree(f), function)
                )
            else:
                ok = name in found
            if not ok:
                unread.append(path)
    return unread
