"""Session-wide settings and fixtures; the paths and data helpers live in tests/support/paths.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.paths import REPO, cxr14_images

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")


@pytest.fixture(scope="session")
def sample_png() -> bytes:
    return cxr14_images(1)[0].read_bytes()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
