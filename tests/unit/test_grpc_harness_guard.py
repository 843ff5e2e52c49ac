"""Guard on the test harness itself: no test drives an in-process grpc.aio server from another
thread (a sync client against a server on a private loop thread crashed the process once in CI).

A static check over every Python file under tests/: in each top-level function or method (with
everything nested in it), a call that starts an in-process aio server (running_server, create_server,
CxrServer, grpc.aio.server) must not come with a call that creates a thread or a second event loop
(threading.Thread, ThreadPoolExecutor, new_event_loop, call_soon_threadsafe, run_coroutine_threadsafe),
nor with a sync client (grpc.insecure_channel, grpc.secure_channel, CxrClient); and nothing imports a
`threaded` module or imports or defines `server_in_thread`. Sync clients talk to server processes."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.paths import REPO

TESTS = REPO / "tests"

SERVER_STARTS = {"running_server", "create_server", "CxrServer", "server_in_thread", "grpc.aio.server", "aio.server"}
THREADS = {  # a second event loop, or a thread that could run one
    "threading.Thread",
    "Thread",
    "ThreadPoolExecutor",
    "asyncio.new_event_loop",
    "new_event_loop",
    "call_soon_threadsafe",
    "run_coroutine_threadsafe",
}
SYNC_CLIENTS = {"grpc.insecure_channel", "grpc.secure_channel", "CxrClient"}  # grpc.aio.* and AsyncCxrClient are not


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    return ""


def _matches(name: str, names: set[str]) -> bool:
    """`name` is one of `names`, or a qualified call whose last part is (loop.run_in_executor)."""
    return name in names or name.rsplit(".", 1)[-1] in names


def _calls(node: ast.AST) -> list[tuple[int, str]]:
    return [(n.lineno, _dotted(n.func)) for n in ast.walk(node) if isinstance(n, ast.Call)]


def problems_in(source: str, filename: str) -> list[str]:
    """What this file does against the rule; empty when it is clean."""
    tree = ast.parse(source, filename)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.endswith("threaded"):
            found.append(f"{filename}:{node.lineno}: imports {node.module}")
        if isinstance(node, ast.ImportFrom) and any(a.name == "server_in_thread" for a in node.names):
            found.append(f"{filename}:{node.lineno}: imports server_in_thread")
    functions = ast.FunctionDef | ast.AsyncFunctionDef
    units = [n for n in tree.body if isinstance(n, functions)]
    units += [m for c in tree.body if isinstance(c, ast.ClassDef) for m in c.body if isinstance(m, functions)]
    for unit in units:
        if unit.name == "server_in_thread":
            found.append(f"{filename}:{unit.lineno}: defines server_in_thread")
        calls = _calls(unit)
        starts = [(line, name) for line, name in calls if _matches(name, SERVER_STARTS)]
        if not starts:
            continue
        where = f"{filename}:{starts[0][0]} {unit.name}() starts an in-process server ({starts[0][1]})"
        for line, name in calls:
            if _matches(name, THREADS):
                found.append(f"{where} and a thread or second loop at line {line} ({name})")
            elif name in SYNC_CLIENTS or name.endswith(".CxrClient"):
                found.append(f"{where} and a sync grpc client at line {line} ({name})")
    return found


def tree_problems(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        out += problems_in(path.read_text(), str(path.relative_to(root.parent)))
    return out


def test_no_test_runs_an_in_process_aio_server_from_another_thread():
    assert tree_problems(TESTS) == []


THE_OLD_HARNESS = """
import asyncio, threading
import grpc
from tests.support.servers import running_server

def server_in_thread(settings, build):
    loop = asyncio.new_event_loop()
    async def main():
        async with running_server(settings, build(settings)) as server:
            pass
    threading.Thread(target=lambda: loop.run_until_complete(main())).start()

def test_uses_it():
    with server_in_thread(1, 2) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        pass
"""

THE_NEW_WAY = """
import grpc
from tests.support.servers import running_server

async def test_on_the_servers_loop(settings, binding):
    async with running_server(settings, binding) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            pass

def test_subprocess_server(tmp_path):
    with service_process(tmp_path) as svc, grpc.insecure_channel(svc.target) as ch:
        pass
"""


def test_the_check_sees_the_old_harness_and_passes_the_allowed_patterns():
    found = problems_in(THE_OLD_HARNESS, "old.py")
    assert any("defines server_in_thread" in p for p in found), found
    assert any("thread or second loop" in p and "new_event_loop" in p for p in found), found
    assert any("thread or second loop" in p and "threading.Thread" in p for p in found), found
    assert any("test_uses_it" in p and "sync grpc client" in p for p in found), found
    assert problems_in(THE_NEW_WAY, "new.py") == []
    assert problems_in("from tests.reliability.threaded import server_in_thread\n", "imp.py") == [
        "imp.py:1: imports tests.reliability.threaded",
        "imp.py:1: imports server_in_thread",
    ]
