"""TensorRT on a CUDA device (skipped without one, or without requirements/gpu.txt unless CXR_REQUIRE_TENSORRT=1
makes that a failure): float16 and int8 engines are built for the model's max batch, warmed up and checked at
load, and a larger batch runs in slices."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

from cxr_serving.device import InferenceDevice
from cxr_serving.runtimes.check import classification_check
from cxr_serving.runtimes.config import RuntimeConfig, resolve_runtime
from cxr_serving.runtimes.prepare import META, RuntimeRequest, prepare_runtime, weights_digest
from cxr_serving.settings import PerformanceConfig
from tests.support.cuda import NEEDS_CUDA, missing_library
from tests.support.paths import CXR14

pytestmark = NEEDS_CUDA
MAX_BATCH = 4


def require(module: str) -> None:
    decision = missing_library(
        module, cuda=torch.cuda.is_available(), installed=importlib.util.find_spec(module) is not None
    )
    if decision is not None:
        (pytest.fail if decision[0] == "fail" else pytest.skip)(decision[1])


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 3),
    ).eval()


def _preprocess(decoded):
    x = torch.from_numpy(decoded.pixels)[None, None]
    return nn.functional.interpolate(x, size=(64, 64), mode="area")[0] * 4 - 2


def _judge(ref, got):
    probs = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    return classification_check(probs(ref), probs(got), np.full(3, 0.5, np.float32), 0.05, 0.9)


@pytest.mark.parametrize("precision", ["float16", "int8"])
def test_an_engine_for_the_models_max_batch_serves_after_warm_up_and_check(tmp_path, precision):
    require("torch_tensorrt")
    if precision == "int8":
        require("modelopt")
    net = _net()
    device = InferenceDevice.resolve("cuda", PerformanceConfig())
    request = RuntimeRequest(
        "trt-gpu", net, (1, 64, 64), {"weights": weights_digest(net)}, _preprocess, _judge,
        max_batch_size=MAX_BATCH,
        warm_up=lambda forward: device.warm_up(forward, (1, 64, 64), MAX_BATCH, 1),
    )  # fmt: skip
    cfg = RuntimeConfig(backend="tensorrt", precision=precision, calibration_images=8, check_images=8)
    update = {"cache_dir": tmp_path / "cache", "calibration_dir": CXR14 / "images"}
    out = prepare_runtime(resolve_runtime(cfg.model_copy(update=update), None), request, device="cuda")
    assert (out.backend, out.precision) == ("tensorrt", precision), out.note
    assert out.check is not None and out.check.passed and "warmup_s" in out.timings
    meta = json.loads((out.cache_path / META).read_text())
    assert meta["profile"]["max_shape"][0] == MAX_BATCH and meta["profile"]["min_shape"][0] == 1
    x = torch.rand(2 * MAX_BATCH + 1, 1, 64, 64)  # past the profile: run in slices of MAX_BATCH
    got = out.forward(x).cpu()
    with torch.inference_mode():
        want = net(x)
    assert got.shape == want.shape and torch.allclose(got, want, atol=0.1)
