"""performance.use_amp on CPU pays where it applies: bfloat16 forwards of the served networks against
float32 forwards of the same network, timed in turn in one process (a ratio, never an absolute time).
docs/performance-history.md has the full numbers (2.0x densenet121, 2.1x U-Net on an AVX512-BF16 host)."""

from __future__ import annotations

import time

import pytest
import torch

from cxr_classification.config import MultiLabelClassifierConfig
from cxr_classification.model import ChestXrayClassifier
from cxr_segmentation.config import SegmentationConfig
from cxr_segmentation.model import SegmentationModel
from cxr_serving.device import InferenceDevice
from cxr_serving.optimize.amp import cpu_has_native_bf16
from cxr_serving.settings import PerformanceConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not cpu_has_native_bf16(), reason="use_amp applies only on CPUs with native bfloat16"),
]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def best_of_turns(fns: dict[str, object], batch: list[torch.Tensor], turns: int = 4) -> dict[str, float]:
    """Each model's fastest predict over `turns`, the models taking turns (a slow moment hits both)."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(turns):
        for name, predict in fns.items():
            t = time.perf_counter()
            predict(batch)  # type: ignore[operator]
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def devices() -> tuple[InferenceDevice, InferenceDevice]:
    fp32 = InferenceDevice.resolve("cpu", PerformanceConfig(cpu_threads=1))
    bf16 = InferenceDevice.resolve("cpu", PerformanceConfig(cpu_threads=1, use_amp=True))
    assert not fp32.use_amp and bf16.use_amp
    return fp32, bf16


def test_bf16_classifier_forward_is_faster(one_thread) -> None:
    fp32_dev, bf16_dev = devices()
    cfg = MultiLabelClassifierConfig(allow_untrained=True, input_size=160)
    models = {name: ChestXrayClassifier("m", cfg, dev) for name, dev in (("fp32", fp32_dev), ("bf16", bf16_dev))}
    for m in models.values():
        m.load()
    assert models["bf16"].precision == "bfloat16"
    from cxr_classification.model import ClassifierInput

    batch = [ClassifierInput(torch.rand(3, 160, 160)) for _ in range(8)]
    best = best_of_turns({k: m.predict for k, m in models.items()}, batch)
    assert best["fp32"] / best["bf16"] > 1.3, best


def test_bf16_segmentation_forward_is_faster(one_thread) -> None:
    fp32_dev, bf16_dev = devices()
    cfg = SegmentationConfig(allow_untrained=True, input_size=192)
    models = {name: SegmentationModel(cfg, dev) for name, dev in (("fp32", fp32_dev), ("bf16", bf16_dev))}
    for m in models.values():
        m.load()
    assert models["bf16"].precision == "bfloat16"
    batch = [torch.rand(3, 192, 192) for _ in range(8)]
    best = best_of_turns({k: m.predict for k, m in models.items()}, batch)
    assert best["fp32"] / best["bf16"] > 1.3, best
