"""`performance.tf32` reaches the model runtime: both model types hand their device's TF32 setting to
`prepare_runtime` (TensorRT builds float32 engines with or without TF32 by it), for either value."""

from __future__ import annotations

from typing import Any

import pytest

from cxr_classification import model as classification_model
from cxr_classification.config import MultiLabelClassifierConfig
from cxr_classification.model import ChestXrayClassifier
from cxr_segmentation import model as segmentation_model
from cxr_segmentation.config import SegmentationConfig
from cxr_segmentation.model import SegmentationModel
from cxr_serving.device import InferenceDevice
from cxr_serving.runtimes.config import RuntimeConfig, resolve_runtime
from cxr_serving.runtimes.prepare import RuntimeOutcome
from cxr_serving.settings import PerformanceConfig
from tests.support.paths import CXR14

pytestmark = pytest.mark.slow  # two DenseNet-121 and two U-Net loads


def _recording(calls: list[dict[str, Any]]) -> Any:
    def prepare(runtime: Any, request: Any, **kwargs: Any) -> RuntimeOutcome:
        calls.append(kwargs)
        return RuntimeOutcome()  # torch serves: the test is about what the model passes, not the runtime

    return prepare


@pytest.mark.parametrize("tf32", [True, False])
def test_both_model_types_pass_performance_tf32_to_the_runtime(tf32: bool, tmp_path, monkeypatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(classification_model, "prepare_runtime", _recording(calls))
    monkeypatch.setattr(segmentation_model, "prepare_runtime", _recording(calls))
    runtime = resolve_runtime(
        RuntimeConfig(backend="onnxruntime", calibration_dir=CXR14 / "images", cache_dir=tmp_path), tmp_path
    )
    device = InferenceDevice.resolve("cpu", PerformanceConfig(tf32=tf32))
    assert device.tf32 is tf32
    cls_cfg = MultiLabelClassifierConfig(allow_untrained=True, input_size=64)
    ChestXrayClassifier("multiclass_classifier", cls_cfg, device, warmup_batches=0, runtime=runtime).load()
    seg_cfg = SegmentationConfig(enabled=True, allow_untrained=True, input_size=64, encoder="resnet18")
    SegmentationModel(seg_cfg, device, warmup_batches=0, runtime=runtime).load()
    assert [c["tf32"] for c in calls] == [tf32, tf32]
    assert all(c["device"] == device.device for c in calls)
