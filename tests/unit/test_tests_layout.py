"""The layout of tests/ stays as documented: helpers only in tests/support, CUDA tests only in tests/gpu.

A helper module elsewhere, a test importing another test module or a conftest, or a CUDA test outside
tests/gpu fails here with the offending file named, so the layout does not drift back."""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import torch

from tests.support.cuda import NEEDS_CUDA
from tests.support.paths import REPO

TESTS = REPO / "tests"
SUPPORT = TESTS / "support"
GPU = TESTS / "gpu"
TEST_ENTRY_POINTS = ("conftest.py", "__init__.py")  # what pytest itself needs beside test_*.py


def _python_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" not in path.parts:
            yield path


def _outside(root: Path) -> Iterator[Path]:
    return (p for p in _python_files(TESTS) if not p.is_relative_to(root))


def _imported_modules(tree: ast.AST) -> Iterator[str]:
    """Every module a file imports, at any depth, including `pytest.importorskip("...")`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "importorskip"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _cuda_uses(tree: ast.AST) -> Iterator[str]:
    """What makes a test need a CUDA device: the gpu mark, a CUDA availability check, `.cuda()`, a torch.cuda call."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "NEEDS_CUDA":
            yield f"line {node.lineno}: NEEDS_CUDA"
        elif isinstance(node, ast.Attribute):
            name = _dotted(node)
            if name.endswith(("mark.gpu", "cuda.is_available")):
                yield f"line {node.lineno}: {name}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = _dotted(node.func)
            if node.func.attr == "cuda" or (name.startswith("torch.cuda.") and not name.endswith("Error")):
                yield f"line {node.lineno}: {name}()"


def test_helper_modules_live_only_in_tests_support() -> None:
    strays = [
        str(p.relative_to(REPO))
        for p in _outside(SUPPORT)
        if not (p.name.startswith("test_") or p.name in TEST_ENTRY_POINTS)
    ]
    assert strays == [], f"helper modules belong in tests/support: {strays}"


def test_no_file_imports_a_test_module_or_a_conftest() -> None:
    """Shared code comes from tests/support, never from another test module or a conftest."""
    found = []
    for path in _python_files(TESTS):
        for module in _imported_modules(ast.parse(path.read_text(), str(path))):
            last = module.rsplit(".", 1)[-1]
            if module.startswith("tests.") and (last.startswith("test_") or last == "conftest"):
                found.append(f"{path.relative_to(REPO)} imports {module}")
    assert found == [], "move the shared names to tests/support:\n" + "\n".join(found)


def test_cuda_tests_live_only_in_tests_gpu() -> None:
    found = []
    for path in _outside(GPU):
        if path in (SUPPORT / "cuda.py", Path(__file__).resolve()):
            continue  # where NEEDS_CUDA is defined, and this check
        for use in _cuda_uses(ast.parse(path.read_text(), str(path))):
            found.append(f"{path.relative_to(REPO)} {use}")
    assert found == [], "tests that need CUDA belong in tests/gpu:\n" + "\n".join(found)


def test_every_gpu_test_module_is_marked_and_skips_without_cuda() -> None:
    modules = sorted(GPU.glob("test_*.py"))
    assert modules, "tests/gpu holds the CUDA tests"
    unmarked = []
    for path in modules:
        tree = ast.parse(path.read_text(), str(path))
        marks = [
            node.value
            for node in tree.body
            if isinstance(node, ast.Assign) and any(_dotted(t) == "pytestmark" for t in node.targets)
        ]
        if not any(isinstance(v, ast.Name) and v.id == "NEEDS_CUDA" for v in marks):
            unmarked.append(str(path.relative_to(REPO)))
    assert unmarked == [], f"set `pytestmark = NEEDS_CUDA` (tests/support/cuda.py) in {unmarked}"
    (gpu, skipif) = NEEDS_CUDA
    assert gpu.name == "gpu" and skipif.name == "skipif"
    assert skipif.args == (not torch.cuda.is_available(),)


def test_make_test_collects_tests_gpu() -> None:
    """`make test` runs pytest with the configured testpaths: tests/gpu must be under one of them."""
    pytest_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert any(GPU.is_relative_to(REPO / p) for p in pytest_cfg["testpaths"])
    assert (GPU / "__init__.py").exists()  # unique module names beside tests/unit's
    assert any(m.startswith("gpu:") for m in pytest_cfg["markers"])
