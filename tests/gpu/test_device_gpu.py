"""InferenceDevice on a CUDA device (skipped without one): torch.compile's modes answer like eager."""

from __future__ import annotations

import pytest
import torch

from cxr_serving.device import InferenceDevice
from cxr_serving.settings import PerformanceConfig
from tests.support.cuda import NEEDS_CUDA

pytestmark = NEEDS_CUDA


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_modes_on_gpu_answer_like_eager(mode: str) -> None:
    dev = InferenceDevice.resolve(
        "cuda", PerformanceConfig(compile_models=True, compile_mode=mode, tf32=False, use_amp=False)
    )
    assert dev.compile and dev.compile_mode == mode
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    ).eval()
    eager = torch.nn.Sequential(*[m for m in net]).cuda()  # the same parameters, moved once
    model = dev.prepare(net)
    with dev.inference():
        for size in (1, 2, 5, 2):  # CUDA graphs replay per size; results are read before the next call
            x = torch.rand(size, 3, 32, 32).cuda()
            assert torch.allclose(model(dev.batch_to_device(x)).float().cpu(), eager(x).cpu(), atol=1e-4)
