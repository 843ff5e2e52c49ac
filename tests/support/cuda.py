"""The marks of every test in tests/gpu: `gpu` (`pytest -m gpu` selects them), skipped where torch sees no CUDA;
and what a GPU test does when a GPU-only library is missing."""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest
import torch

NEEDS_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def missing_library(
    module: str, *, cuda: bool, installed: bool, environ: Mapping[str, str] = os.environ
) -> tuple[str, str] | None:
    """What to do when `module` (requirements/gpu.txt) is absent: ("skip" | "fail", why), None when present. On a
    GPU machine with CXR_REQUIRE_TENSORRT=1 (a run meant to measure TensorRT) its absence fails the test instead
    of a skip that reads like a pass."""
    if installed:
        return None
    why = f"{module} is not installed (requirements/gpu.txt)"
    if cuda and environ.get("CXR_REQUIRE_TENSORRT") == "1":
        return "fail", f"{why} and CXR_REQUIRE_TENSORRT=1"
    return "skip", why
