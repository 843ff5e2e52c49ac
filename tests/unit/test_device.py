"""InferenceDevice on CPU: channels_last applies (oneDNN NHWC convolutions)."""

from __future__ import annotations

import torch

from cxr_serving.device import InferenceDevice
from cxr_serving.settings import PerformanceConfig


def test_channels_last_applies_on_cpu() -> None:
    dev = InferenceDevice.resolve("cpu", PerformanceConfig())
    assert dev.channels_last and not dev.is_cuda and not dev.use_amp and not dev.compile
    conv = dev.prepare(torch.nn.Conv2d(3, 4, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    batch = dev.batch_to_device(torch.rand(2, 3, 8, 8))
    assert batch.is_contiguous(memory_format=torch.channels_last)
    with dev.inference():
        assert torch.allclose(
            conv(batch), torch.nn.functional.conv2d(batch.contiguous(), conv.weight, conv.bias), atol=1e-5
        )


def test_channels_last_can_be_turned_off() -> None:
    dev = InferenceDevice.resolve("cpu", PerformanceConfig(channels_last=False))
    assert not dev.channels_last
    assert dev.batch_to_device(torch.rand(2, 3, 8, 8)).is_contiguous()
