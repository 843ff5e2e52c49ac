"""A fallback's note names the precision torch serves in: float32, or bfloat16 where performance.use_amp autocasts
the network (the classifier's path is tested through the real service in
tests/integration/test_model_runtimes_service.py; this is the segmentation model's, and the outcome's own rule)."""

from __future__ import annotations

import pytest

from cxr_segmentation.config import SegmentationConfig
from cxr_segmentation.model import SegmentationModel
from cxr_serving import device as device_module
from cxr_serving.device import InferenceDevice
from cxr_serving.runtimes.config import RuntimeConfig, resolve_runtime
from cxr_serving.runtimes.prepare import RuntimeOutcome
from cxr_serving.settings import PerformanceConfig
from tests.support.paths import CXR14

WHY = "tensorrt/int8 unavailable: tensorrt needs a CUDA device and none is available"


@pytest.mark.parametrize(("use_amp", "precision"), [(False, "float32"), (True, "bfloat16")])
def test_the_segmentation_model_names_the_torch_precision_it_falls_back_to(
    use_amp, precision, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)  # emulated where not native
    runtime = resolve_runtime(
        RuntimeConfig(backend="tensorrt", precision="int8", calibration_dir=CXR14 / "images", cache_dir=tmp_path),
        tmp_path,
    )
    device = InferenceDevice.resolve("cpu", PerformanceConfig(use_amp=use_amp))
    cfg = SegmentationConfig(enabled=True, allow_untrained=True, input_size=64, encoder="resnet18")
    model = SegmentationModel(cfg, device, warmup_batches=0, runtime=runtime)
    model.load()
    assert (model.backend, model.precision) == ("torch", precision)
    assert model.runtime_note == f"{precision} torch serves: {WHY}"


def test_torch_serves_renames_only_a_fallback() -> None:
    served = RuntimeOutcome(backend="openvino", precision="int8", note="accuracy check passed: x=1")
    assert served.torch_serves("bfloat16") is served
    fallback = RuntimeOutcome(note=f"float32 torch serves: {WHY}", fallback_why=WHY)
    renamed = fallback.torch_serves("bfloat16")
    assert (renamed.precision, renamed.note, renamed.fallback_why) == ("bfloat16", f"bfloat16 torch serves: {WHY}", WHY)
