"""performance.trace_models: a frozen TorchScript trace on CPU, kept only if it answers like the eager network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cxr_serving.device import InferenceDevice
from cxr_serving.optimize.torchscript import is_traced, traced
from cxr_serving.settings import PerformanceConfig


class SmallCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


class BatchBakedIn(SmallCnn):
    """Reshapes with the batch size as a Python int: the trace bakes in the example's batch of 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).reshape(1, -1)[:, :8]).expand(int(x.shape[0]), -1) * x.mean()


class ReturnsAString(SmallCnn):
    def forward(self, x: torch.Tensor) -> str:  # type: ignore[override]
        return "not a tensor"


def _example(batch: int = 1, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_a_traceable_network_is_frozen_and_answers_like_eager() -> None:
    net = SmallCnn().eval()
    graph, why_not = traced(net, _example())
    assert why_not == "" and is_traced(graph)
    x = _example(5)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), net(x), rtol=1e-5, atol=1e-6)


def test_a_trace_that_bakes_in_the_batch_size_is_refused() -> None:
    net = BatchBakedIn().eval()
    kept, why_not = traced(net, _example())
    assert kept is net and not is_traced(kept)
    assert "deviates" in why_not or "failed" in why_not


def test_an_untraceable_network_stays_eager() -> None:
    net = ReturnsAString().eval()
    kept, why_not = traced(net, _example())
    assert kept is net and why_not.startswith("trace failed")


def test_resolve_traces_only_cpu_float32() -> None:
    assert InferenceDevice.resolve("cpu", PerformanceConfig()).trace is True
    assert InferenceDevice.resolve("cpu", PerformanceConfig(trace_models=False)).trace is False
    amp = InferenceDevice.resolve("cpu", PerformanceConfig(use_amp=True))
    assert amp.trace is (not amp.use_amp)  # autocast keeps its eager wrapper


@pytest.mark.parametrize(
    ("name", "size"), [("densenet121", 64), ("swin_tiny_patch4_window7_224", 224)], ids=["densenet121", "swin"]
)
def test_prepare_traces_the_real_classifiers(name: str, size: int) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=3).eval()
    device = InferenceDevice.resolve("cpu", PerformanceConfig(use_amp=False, cpu_threads=1))
    runner = device.prepare(net, example=_example(1, size))
    assert is_traced(runner)
    x = device.batch_to_device(_example(3, size))
    with torch.inference_mode():
        torch.testing.assert_close(runner(x), net(x), rtol=1e-3, atol=1e-4)


def test_prepare_keeps_eager_when_turned_off() -> None:
    device = InferenceDevice.resolve("cpu", PerformanceConfig(trace_models=False, use_amp=False))
    assert not is_traced(device.prepare(SmallCnn(), example=_example()))


def test_the_served_classifier_and_segmenter_answer_traced_as_eager() -> None:
    """The services' own models (ClassifierNetwork with its activation and output index; the U-Net):
    traced at load by default, with the same answers as with trace_models off."""
    import numpy as np

    from cxr_classification.config import MultiLabelClassifierConfig
    from cxr_classification.model import ChestXrayClassifier, ClassifierInput
    from cxr_segmentation.config import SegmentationConfig
    from cxr_segmentation.model import SegmentationModel

    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    answers = {}
    for trace in (True, False):
        device = InferenceDevice.resolve("cpu", PerformanceConfig(trace_models=trace, use_amp=False))
        cls = ChestXrayClassifier("multi", MultiLabelClassifierConfig(allow_untrained=True, input_size=64), device)
        cls.load()
        seg = SegmentationModel(
            SegmentationConfig(allow_untrained=True, input_size=64, encoder="resnet18"), device, warmup_batches=0
        )
        seg.load()
        assert is_traced(cls._runner) is trace and is_traced(seg._net) is trace
        assert cls.precision == seg.precision == "float32"
        probs = np.stack([o.probabilities for o in cls.predict([ClassifierInput(t) for t in x])])
        answers[trace] = (probs, torch.stack(list(seg.predict([*x]))))
    np.testing.assert_allclose(answers[True][0], answers[False][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(answers[True][1], answers[False][1], rtol=1e-4, atol=1e-4)
