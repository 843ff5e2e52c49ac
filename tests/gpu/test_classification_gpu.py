"""ChestXrayClassifier on a CUDA device (skipped without one): AMP and channels_last agree with the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_classification.model import ChestXrayClassifier
from cxr_serving.device import InferenceDevice
from cxr_serving.settings import PerformanceConfig
from tests.support.classifiers import inputs, small_densenet
from tests.support.cuda import NEEDS_CUDA

pytestmark = NEEDS_CUDA

CPU = InferenceDevice.resolve("cpu", PerformanceConfig())


@pytest.fixture(scope="module")
def densenet():
    return small_densenet()


def test_gpu_amp_channels_last_matches_cpu(densenet):
    perf = PerformanceConfig(use_amp=True, amp_dtype="bfloat16")
    gpu = ChestXrayClassifier("multi", densenet.cfg, InferenceDevice.resolve("cuda", perf), max_batch_size=4)
    gpu.load()
    gpu._network.load_state_dict(densenet._network.state_dict())  # same random weights as the CPU model
    items = inputs(densenet, 4)
    cpu_out = densenet.predict(items)
    gpu_out = gpu.predict(items)
    for a, b in zip(cpu_out, gpu_out, strict=True):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=2e-2)
    assert gpu.device.startswith("cuda")
