"""tests/gpu/test_tensorrt_gpu.py's decision when requirements/gpu.txt is absent, checked without a GPU: on a GPU
machine with CXR_REQUIRE_TENSORRT=1 the TensorRT test fails instead of skipping."""

from __future__ import annotations

import pytest

from tests.support.cuda import missing_library


@pytest.mark.parametrize(
    ("cuda", "installed", "environ", "want"),
    [
        (True, False, {"CXR_REQUIRE_TENSORRT": "1"}, "fail"),
        (True, False, {}, "skip"),
        (True, False, {"CXR_REQUIRE_TENSORRT": "0"}, "skip"),
        (False, False, {"CXR_REQUIRE_TENSORRT": "1"}, "skip"),  # no GPU: the whole file skips anyway
        (True, True, {"CXR_REQUIRE_TENSORRT": "1"}, None),
    ],
)
def test_a_missing_tensorrt_fails_only_on_a_gpu_that_requires_it(cuda, installed, environ, want):
    decision = missing_library("torch_tensorrt", cuda=cuda, installed=installed, environ=environ)
    assert (decision[0] if decision else None) == want
    if decision:
        assert "torch_tensorrt is not installed (requirements/gpu.txt)" in decision[1]
