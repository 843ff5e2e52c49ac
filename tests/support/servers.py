"""Start real servers on 127.0.0.1 with ephemeral ports for tests."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

from cxr_serving.server import CxrServer, ServiceBinding, create_server
from cxr_serving.settings import Settings, load_settings

TEST_KEY = "test-key-0123456789"


def make_settings(**overrides: Any) -> Settings:
    """Defaults for tests: loopback, ephemeral ports, auth on with TEST_KEY. Tests that are not about roles
    use one key holding both roles (TEST_KEY is also an admin key); tests/reliability/test_admin_role.py
    configures separate inference and admin keys."""
    env = {"CXR_API_KEY": TEST_KEY, "CXR_ADMIN_API_KEY": TEST_KEY}
    s = load_settings(None, environ=env)
    data = s.model_dump()
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return Settings.model_validate(data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def running_server(
    settings: Settings, binding: ServiceBinding, *, wait_ready: bool = True
) -> AsyncIterator[CxrServer]:
    server = create_server(settings, binding, host="127.0.0.1", port=0, metrics_port=0)
    await server.start()
    try:
        if wait_ready:
            await server.wait_until_ready(120)
        yield server
    finally:
        await server.stop(grace=1)


def auth(key: str = TEST_KEY) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key),)
