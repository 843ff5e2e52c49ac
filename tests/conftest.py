"""Session-wide settings and fixtures; the paths and data helpers live in tests/support/paths.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# a check shared by the CPU and CUDA tests of frontend processes: its asserts report their values as a test's do
pytest.register_assert_rewrite("tests.support.frontend_classify")

from tests.support.paths import REPO, cxr14_images  # noqa: E402 - after the rewrite is registered

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")


@pytest.fixture(scope="session")
def sample_png() -> bytes:
    return cxr14_images(1)[0].read_bytes()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Shared service stacks stop here, inside the session, so their shutdown logs go somewhere."""
    import sys

    stacks = sys.modules.get("tests.support.client_stack")
    if stacks is not None:
        stacks.stop_stacks()
