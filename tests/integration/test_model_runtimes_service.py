"""Model runtimes through the real classification service over gRPC: an untrained DenseNet-121 at 64 px served
by OpenVINO or ONNX Runtime, exported into a cache that a restart reuses, or falling back to float32 torch when
the load-time accuracy check fails; ListModels and every prediction say which backend and precision served."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from cxr_classification.config import MultiLabelClassifierConfig
from cxr_classification.model import ChestXrayClassifier, ClassifierInput
from cxr_classification.service import build_binding
from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_serving import device as device_module
from cxr_serving.device import InferenceDevice
from cxr_serving.images import decode_image
from cxr_serving.runtimes import backends
from cxr_serving.settings import PerformanceConfig
from tests.support.paths import CXR14, cxr14_images
from tests.support.runtime_backends import FixedBatchOnnx
from tests.support.servers import auth, make_settings, running_server

MULTI = "multiclass_classifier"
IMAGES = 3


def _settings(tmp_path, *, warmup_batches: int = 0, use_amp: bool = False, **runtime):
    runtime = {
        "calibration_dir": str(CXR14 / "images"),
        "cache_dir": str(tmp_path / "cache"),
        "calibration_images": 8,
        "check_images": 8,
        **runtime,
    }
    model = {
        "task": "multilabel_classification",
        "architecture": "densenet121",
        "allow_untrained": True,
        "input_size": 64,
        "runtime": runtime,
    }
    return make_settings(
        models={MULTI: model},
        server_config__max_batch_delay_ms=5,
        server_config__max_batch_size=8,
        performance__warmup_batches=warmup_batches,
        performance__use_amp=use_amp,
    )


def _torch_probabilities() -> np.ndarray:
    """What float32 torch answers for the test images (the same untrained weights: the same seed)."""
    cfg = MultiLabelClassifierConfig(allow_untrained=True, input_size=64)
    model = ChestXrayClassifier(MULTI, cfg, InferenceDevice.resolve("cpu", PerformanceConfig()))
    model.load()
    items = [ClassifierInput(model.preprocess(decode_image(p.read_bytes()))) for p in cxr14_images(IMAGES)]
    return np.stack([o.probabilities for o in model.predict(items)])


async def _serve(settings):
    """(ListModels' entry, the predictions' model infos, the probabilities) from one start of the service."""
    async with running_server(settings, build_binding(settings)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.ClassificationServiceStub(ch)
            (listed,) = (await stub.ListModels(pb.ListModelsRequest(), metadata=auth())).models
            infos, probs = [], []
            for p in cxr14_images(IMAGES):
                image = common_pb2.Image(data=p.read_bytes(), content_type="image/png")
                (pred,) = (await stub.ClassifyImage(pb.ClassifyImageRequest(image=image), metadata=auth())).predictions
                infos.append(pred.model)
                probs.append([f.probability for f in pred.findings])
    return listed, infos, np.array(probs)


def _exports(backend, precision):
    labels = {"model": MULTI, "backend": backend, "precision": precision}
    return REGISTRY.get_sample_value("cxr_model_runtime_exports_total", labels) or 0.0


async def test_openvino_serves_like_torch_and_a_restart_reuses_the_export(tmp_path):
    settings = _settings(tmp_path, backend="openvino", precision="float32")
    before = _exports("openvino", "float32")
    listed, infos, probs = await _serve(settings)
    assert (listed.backend, listed.precision, listed.state) == ("openvino", "float32", common_pb2.MODEL_STATE_READY)
    assert listed.runtime_note.startswith("accuracy check passed: max_abs_delta_p=") and listed.untrained
    assert {(i.backend, i.precision) for i in infos} == {("openvino", "float32")}
    np.testing.assert_allclose(probs, _torch_probabilities(), atol=1e-4, rtol=0)
    assert _exports("openvino", "float32") == before + 1
    (entry,) = (tmp_path / "cache" / MULTI).iterdir()
    stamps = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    assert {"model.xml", "model.bin", "meta.json"} <= set(stamps)

    listed_again, _, probs_again = await _serve(settings)  # a restart with the same cache
    assert (listed_again.backend, listed_again.precision) == ("openvino", "float32")
    assert _exports("openvino", "float32") == before + 1  # nothing exported
    assert [p.name for p in (tmp_path / "cache" / MULTI).iterdir()] == [entry.name]
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == stamps
    np.testing.assert_array_equal(probs_again, probs)


async def test_onnxruntime_int8_that_fails_the_check_falls_back_to_torch_float32(tmp_path):
    """A bound int8 cannot meet (|Δp| ≤ 0.001): the service still starts, float32 torch serves, and ListModels,
    every prediction and the metrics say why."""
    settings = _settings(tmp_path, backend="onnxruntime", precision="int8", max_probability_delta=0.001)
    listed, infos, probs = await _serve(settings)
    assert (listed.backend, listed.precision, listed.state) == ("torch", "float32", common_pb2.MODEL_STATE_READY)
    note = listed.runtime_note
    assert note.startswith("float32 torch serves: onnxruntime/int8 failed the accuracy check against float32 torch")
    assert "max |Δp|" in note and "> 0.001" in note
    assert {(i.backend, i.precision, i.runtime_note) for i in infos} == {("torch", "float32", note)}
    np.testing.assert_allclose(probs, _torch_probabilities(), atol=1e-5, rtol=0)
    labels = {"model": MULTI, "backend": "onnxruntime", "precision": "int8", "metric": "max_abs_delta_p"}
    assert REGISTRY.get_sample_value("cxr_model_runtime_check", labels) > 0.001
    assert REGISTRY.get_sample_value("cxr_model_runtime_fallback", {"model": MULTI}) == 1


async def test_tensorrt_int8_without_a_gpu_serves_float32_torch_and_says_why(tmp_path):
    """The real service on this GPU-less host, configured for TensorRT int8: it starts, float32 torch serves,
    and ListModels, every prediction and the fallback gauge say why."""
    listed, infos, probs = await _serve(_settings(tmp_path, backend="tensorrt", precision="int8", warmup_batches=1))
    note = "float32 torch serves: tensorrt/int8 unavailable: tensorrt needs a CUDA device and none is available"
    assert (listed.backend, listed.precision, listed.state, listed.runtime_note) == (
        "torch", "float32", common_pb2.MODEL_STATE_READY, note
    )  # fmt: skip
    assert {(i.backend, i.precision, i.runtime_note) for i in infos} == {("torch", "float32", note)}
    np.testing.assert_allclose(probs, _torch_probabilities(), atol=1e-5, rtol=0)
    assert REGISTRY.get_sample_value("cxr_model_runtime_fallback", {"model": MULTI}) == 1


async def test_a_fallback_under_use_amp_names_the_autocast_precision_it_serves_in(tmp_path, monkeypatch):
    """TensorRT unavailable on this host and performance.use_amp on: torch serves in bfloat16 autocast, and
    the note says so instead of claiming float32. A CPU without native bfloat16 runs it emulated: the check of
    the CPU is set aside, so the test runs on every host."""
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    settings = _settings(tmp_path, backend="tensorrt", precision="int8", use_amp=True)
    listed, infos, _ = await _serve(settings)
    note = "bfloat16 torch serves: tensorrt/int8 unavailable: tensorrt needs a CUDA device and none is available"
    assert (listed.backend, listed.precision, listed.runtime_note) == ("torch", "bfloat16", note)
    assert {(i.backend, i.precision, i.runtime_note) for i in infos} == {("torch", "bfloat16", note)}


async def test_a_runtime_that_fails_its_warm_up_falls_back_instead_of_failing_the_load(tmp_path, monkeypatch):
    """A runtime whose forward passes the check but refuses the warm-up's batch (an export for batches of 8
    only): the model loads in float32 torch, and ListModels and the gauge say it failed at warm-up."""
    monkeypatch.setitem(backends.BACKENDS, "onnxruntime", FixedBatchOnnx)
    listed, infos, probs = await _serve(_settings(tmp_path, backend="onnxruntime", warmup_batches=1))
    assert (listed.backend, listed.precision, listed.state) == ("torch", "float32", common_pb2.MODEL_STATE_READY)
    assert listed.runtime_note.startswith("float32 torch serves: onnxruntime/float32 failed at warm-up: ")
    assert "Got: 1 Expected: 8" in listed.runtime_note
    assert {(i.backend, i.precision) for i in infos} == {("torch", "float32")}
    np.testing.assert_allclose(probs, _torch_probabilities(), atol=1e-5, rtol=0)
    assert REGISTRY.get_sample_value("cxr_model_runtime_fallback", {"model": MULTI}) == 1


async def test_openvino_int8_serves_through_grpc(tmp_path):
    """int8 (NNCF on 8 calibration images) serves when it passes. The bounds are relaxed here: an untrained
    network's probabilities cluster near 0.5, where int8's small errors flip calls (docs/model-runtimes.md)."""
    settings = _settings(tmp_path, backend="openvino", precision="int8", max_probability_delta=0.05, min_agreement=0.5)
    listed, infos, probs = await _serve(settings)
    assert (listed.backend, listed.precision) == ("openvino", "int8")
    assert {(i.backend, i.precision) for i in infos} == {("openvino", "int8")}
    delta = np.abs(probs - _torch_probabilities()).max()
    assert 0 < delta <= 0.05  # quantized (not float32's answer) and within the bound the check enforced
    assert REGISTRY.get_sample_value("cxr_model_runtime_fallback", {"model": MULTI}) == 0


@pytest.mark.parametrize(
    ("backend", "note"),
    [
        ("openvino", "accuracy check passed: min_class_dice=1, mean_dice=1 (bounds min_dice=0.98)"),
        ("onnxruntime", "accuracy check passed: min_class_dice="),
    ],
)
async def test_segmentation_through_a_float32_runtime_passes_the_dice_check_and_says_so(backend: str, note: str):
    """The real segmentation service (untrained U-Net/resnet18 @64) with OpenVINO or ONNX Runtime float32, served
    through gRPC (not only their fallback): the Dice check passes (OpenVINO: 1.0, the same masks), and ListModels
    and the response's model name the runtime."""
    from cxr_protos.segmentation.v1 import segmentation_service_pb2 as spb
    from cxr_protos.segmentation.v1 import segmentation_service_pb2_grpc as sgrpc
    from cxr_segmentation.service import build_binding as build_segmentation

    runtime = {"backend": backend, "precision": "float32", "calibration_dir": str(CXR14 / "images"),
               "calibration_images": 4, "check_images": 4}  # fmt: skip
    seg = {"enabled": True, "allow_untrained": True, "input_size": 64, "encoder": "resnet18", "runtime": runtime}
    settings = make_settings(models__segmentation=seg, performance__warmup_batches=0)
    async with running_server(settings, build_segmentation(settings)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = sgrpc.SegmentationServiceStub(ch)
            (listed,) = (await stub.ListModels(spb.ListModelsRequest(), metadata=auth())).models
            image = common_pb2.Image(data=cxr14_images(1)[0].read_bytes(), content_type="image/png")
            resp = await stub.SegmentImage(spb.SegmentImageRequest(image=image), metadata=auth())
    assert (listed.backend, listed.precision) == (backend, "float32"), listed.runtime_note
    if backend == "openvino":
        assert listed.runtime_note == note
    else:
        assert listed.runtime_note.startswith(note)
    assert (resp.model.backend, resp.model.precision) == (backend, "float32")
    assert len(resp.masks) == len(listed.labels) > 0


async def test_instance_processes_hand_their_runtime_metrics_to_the_server_process():
    """model_instance_mode: process loads (and checks) the runtime in the instance, whose registry nobody
    scrapes: the load hands the check's numbers back and the server process sets the gauges."""
    from cxr_segmentation.service import build_binding as build_segmentation
    from cxr_serving.metrics import RUNTIME_CHECK, RUNTIME_FALLBACK

    RUNTIME_CHECK.clear()
    RUNTIME_FALLBACK.clear()
    runtime = {"backend": "openvino", "precision": "float32", "calibration_dir": str(CXR14 / "images"),
               "calibration_images": 4, "check_images": 4}  # fmt: skip
    seg = {"enabled": True, "allow_untrained": True, "input_size": 64, "encoder": "resnet18", "runtime": runtime}
    settings = make_settings(
        models__segmentation=seg,
        performance__warmup_batches=0,
        server_config__model_instances=1,
        server_config__model_instance_mode="process",
    )
    async with running_server(settings, build_segmentation(settings)):
        labels = {"model": "segmentation", "backend": "openvino", "precision": "float32", "metric": "min_class_dice"}
        assert REGISTRY.get_sample_value("cxr_model_runtime_check", labels) == 1.0
        assert REGISTRY.get_sample_value("cxr_model_runtime_fallback", {"model": "segmentation"}) == 0
