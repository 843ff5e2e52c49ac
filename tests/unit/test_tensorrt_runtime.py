"""TensorRT's runtime on a host without a GPU: its optimization profile and cache key follow the model's max
batch, no batch past the profile reaches the forward, int8's layer selection and its refusals, and a runtime
that fails at export, load or warm-up falls back to float32 torch with the step named (the same load path runs
the engine on a GPU: bench/gpu)."""

from __future__ import annotations

import importlib.util
from typing import ClassVar

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from torch import nn

from cxr_serving.device import InferenceDevice
from cxr_serving.runtimes import backends
from cxr_serving.runtimes.backends import (
    BackendUnavailable,
    OnnxRuntimeBackend,
    TensorRtBackend,
    batch_slices,
    engine_profile,
    float_module_names,
)
from cxr_serving.runtimes.check import classification_check
from cxr_serving.runtimes.config import RuntimeConfig, resolve_runtime
from cxr_serving.runtimes.prepare import RuntimeRequest, cache_key, prepare_runtime, weights_digest
from cxr_serving.settings import PerformanceConfig
from tests.support.paths import CXR14
from tests.support.runtime_backends import FixedBatchOnnx

IMAGES = CXR14 / "images"


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)
    ).eval()


def _preprocess(decoded):
    x = torch.from_numpy(decoded.pixels)[None, None]
    return nn.functional.interpolate(x, size=(32, 32), mode="area")[0]


def _judge(ref, got):
    probs = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    return classification_check(probs(ref), probs(got), np.full(3, 0.5, np.float32), 0.02, 0.9)


def _request(max_batch_size: int = 8, warm_up=None) -> RuntimeRequest:
    net = _net()
    return RuntimeRequest(
        "trt-test", net, (1, 32, 32), {"weights": weights_digest(net)}, _preprocess, _judge,
        max_batch_size=max_batch_size, warm_up=warm_up,
    )  # fmt: skip


def _runtime(tmp_path, backend="onnxruntime", precision="float32"):
    cfg = RuntimeConfig(backend=backend, precision=precision, calibration_images=8, check_images=8)
    return resolve_runtime(cfg.model_copy(update={"cache_dir": tmp_path / "cache", "calibration_dir": IMAGES}), None)


def _cpu_warm_up(max_batch_size: int):
    """The models' own warm-up (InferenceDevice.warm_up on CPU: batch 1, once)."""
    device = InferenceDevice.resolve("cpu", PerformanceConfig())
    return lambda forward: device.warm_up(forward, (1, 32, 32), max_batch_size, 1)


# --- the profile, the slices, the cache key ------------------------------------------------------------


@pytest.mark.parametrize("max_batch", [1, 8, 48])
def test_the_engine_profile_spans_one_to_the_models_max_batch_tuned_for_a_full_batch(max_batch):
    shapes = engine_profile((3, 224, 224), max_batch).shapes
    assert shapes == {
        "min_shape": (1, 3, 224, 224),
        "opt_shape": (max_batch, 3, 224, 224),
        "max_shape": (max_batch, 3, 224, 224),
    }
    assert TensorRtBackend("float16", max_batch_size=max_batch).profile((3, 224, 224)).shapes == shapes


def test_an_engine_profile_without_a_batch_is_refused():
    with pytest.raises(ValueError, match="max_batch_size must be >= 1, not 0"):
        engine_profile((3, 8, 8), 0)


@pytest.mark.parametrize(("size", "max_batch", "sizes"), [(70, 32, [32, 32, 6]), (8, 8, [8]), (3, 8, [3]), (0, 4, [])])
def test_batch_slices_cover_every_item_in_order_and_never_pass_the_max(size, max_batch, sizes):
    parts = batch_slices(size, max_batch)
    assert [p.stop - p.start for p in parts] == sizes
    assert [i for p in parts for i in range(p.start, p.stop)] == list(range(size))


class _VersionedTensorRt(TensorRtBackend):
    """TensorRT's key without torch-tensorrt installed: fixed library versions, the real profile and recipe."""

    def versions(self) -> dict[str, str]:
        return {"torch_tensorrt": "2.14.0", "torch": "2.14.1", "gpu": "NVIDIA H200"}


def test_the_tensorrt_cache_key_changes_with_the_max_batch_and_the_cpu_backends_do_not(tmp_path):
    runtime, request = _runtime(tmp_path, "tensorrt", "float16"), _request()
    keys = {b: cache_key(runtime, request, _VersionedTensorRt("float16", max_batch_size=b), []) for b in (8, 32, 64)}
    assert len(set(keys.values())) == 3
    assert cache_key(runtime, request, _VersionedTensorRt("float16", max_batch_size=32), []) == keys[32]
    cpu = _runtime(tmp_path, "onnxruntime", "float32")  # any batch: the same artefact, no needless re-export
    assert cache_key(cpu, request, OnnxRuntimeBackend("float32", 8), []) == cache_key(
        cpu, request, OnnxRuntimeBackend("float32", 64), []
    )


class _Recorded(OnnxRuntimeBackend):
    """ONNX Runtime that records the batch sizes its forward is given."""

    seen: ClassVar[list[int]] = []

    def load(self, folder):
        forward = super().load(folder)

        def recorded(x):
            _Recorded.seen.append(int(x.shape[0]))
            return forward(x)

        return recorded


def test_neither_the_check_nor_the_warm_up_passes_a_batch_beyond_the_models_max(tmp_path, monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, "onnxruntime", _Recorded)
    monkeypatch.setattr(_Recorded, "seen", [])
    out = prepare_runtime(_runtime(tmp_path), _request(max_batch_size=3, warm_up=_cpu_warm_up(3)))
    assert out.backend == "onnxruntime" and out.check.passed
    assert _Recorded.seen[0] == 1 and max(_Recorded.seen) == 3 and sum(_Recorded.seen[1:]) == 8  # warm-up, check


# --- int8: config, layer selection, refusals -------------------------------------------------------------


def test_tensorrt_int8_is_accepted_at_config_load_and_bfloat16_still_refused():
    assert RuntimeConfig(backend="tensorrt", precision="int8").precision == "int8"
    with pytest.raises(ValueError, match="TensorRT serves float16 here: set precision float16"):
        RuntimeConfig(backend="tensorrt", precision="bfloat16")


def test_int8_keeps_a_cnns_head_and_the_named_layers_in_float():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()), nn.Flatten(), nn.Linear(4, 2))
    assert float_module_names(net, transformer=False, float_layers=()) == ["3"]
    assert float_module_names(net, transformer=True, float_layers=()) == []
    assert float_module_names(net, transformer=False, float_layers=("/1/",)) == ["3", "1", "1.0", "1.1"]
    with pytest.raises(BackendUnavailable, match=r"int8_float_layers \['/decoder/'\] match no node"):
        float_module_names(net, transformer=False, float_layers=("/decoder/",))


def test_tensorrt_int8_on_a_gpu_without_fast_int8_falls_back_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "cuda_available", lambda: True)  # past the GPU probe: the capability check
    monkeypatch.setattr(backends, "cuda_capability", lambda device="cuda": (6, 1))
    out = prepare_runtime(_runtime(tmp_path, "tensorrt", "int8"), _request(), device="cuda")
    assert (out.backend, out.precision, out.forward) == ("torch", "float32", None)
    assert "tensorrt/int8 unavailable: this GPU (compute capability 6.1) has no fast int8" in out.note
    if importlib.util.find_spec("torch_tensorrt") is not None:
        pytest.skip("torch-tensorrt is installed: its import guard is not this host's path")
    # an H200: int8 passes, the import does not
    monkeypatch.setattr(backends, "cuda_capability", lambda device="cuda": (9, 0))
    out = prepare_runtime(_runtime(tmp_path, "tensorrt", "int8"), _request(), device="cuda")
    assert out.backend == "torch" and "tensorrt/int8 unavailable: torch-tensorrt is not installed" in out.note


def test_tensorrt_int8_without_a_gpu_falls_back_and_says_why(tmp_path):
    out = prepare_runtime(_runtime(tmp_path, "tensorrt", "int8"), _request(), device="cuda")
    assert (out.backend, out.forward) == ("torch", None)
    why = "tensorrt/int8 unavailable: tensorrt needs a CUDA device and none is available"
    assert out.note == f"float32 torch serves: {why}"
    assert REGISTRY.get_sample_value("cxr_model_runtime_fallback", {"model": "trt-test"}) == 1


@pytest.mark.skipif(importlib.util.find_spec("modelopt") is None, reason="nvidia-modelopt (requirements/gpu.txt)")
def test_modelopt_int8_quantizes_the_convolutions_and_leaves_the_head_in_float():
    """Runs where nvidia-modelopt is importable (a GPU machine; on CPU with it on PYTHONPATH): the Q/DQ model
    torch-tensorrt builds from, calibrated here on CPU."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    from cxr_serving.runtimes.backends import modelopt_int8

    net = _net()
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        before = net(x)
    modelopt_int8(net, list(torch.rand(8, 1, 32, 32)), transformer=False, float_layers=(), max_batch=3)
    quantizers = {n: q.is_enabled for n, q in net.named_modules() if isinstance(q, TensorQuantizer)}
    assert quantizers["0.weight_quantizer"] and quantizers["0.input_quantizer"]
    assert not quantizers["4.weight_quantizer"] and not quantizers["4.input_quantizer"]
    with torch.no_grad():
        after = net(x)
    assert not torch.equal(before, after) and torch.allclose(before, after, atol=0.05)


# --- each failure point falls back, naming it ------------------------------------------------------------


class _TruncatedExport(OnnxRuntimeBackend):
    """An export that writes a damaged file (as a cut-off engine): loading it fails."""

    def export(self, module, example, calibration, folder, *, transformer, float_layers=()):
        (folder / "model.onnx").write_bytes(b"\x08\x07not a whole model")


class _ExportFails(OnnxRuntimeBackend):
    """An export that stops with an error (as an engine build that runs out of memory)."""

    def export(self, module, example, calibration, folder, *, transformer, float_layers=()):
        raise RuntimeError("engine build ran out of GPU memory")


@pytest.mark.parametrize(
    ("backend", "stage", "why"),
    [
        (_ExportFails, "export", "RuntimeError: engine build ran out of GPU memory"),
        (_TruncatedExport, "load", "InvalidProtobuf"),
        (FixedBatchOnnx, "warm-up", "Got: 1 Expected: 8"),
    ],
)
def test_a_failure_at_export_load_or_warm_up_falls_back_naming_the_step(tmp_path, monkeypatch, backend, stage, why):
    monkeypatch.setitem(backends.BACKENDS, "onnxruntime", backend)
    out = prepare_runtime(_runtime(tmp_path), _request(warm_up=_cpu_warm_up(8)))
    assert (out.backend, out.precision, out.forward) == ("torch", "float32", None)
    assert out.note.startswith(f"float32 torch serves: onnxruntime/float32 failed at {stage}: ") and why in out.note
    assert REGISTRY.get_sample_value("cxr_model_runtime_fallback", {"model": "trt-test"}) == 1


def test_an_escaped_onnx_pattern_selects_the_same_layers_on_tensorrt_as_in_the_onnx_export(tmp_path):
    """A real U-Net (smp, as the segmentation service builds it) exported by the CPU backends' exporter: every
    ONNX node scope is a path onnx_scope_paths writes, and '/net/decoder/blocks\\.0/' selects on TensorRT the
    modules under which the ONNX nodes it matches lie."""
    import re

    import onnx
    import segmentation_models_pytorch as smp

    from cxr_segmentation.networks import LogitsOf
    from cxr_serving.runtimes.backends import export_onnx, onnx_scope_paths

    torch.manual_seed(0)
    net = LogitsOf(smp.create_model("unet", encoder_name="resnet18", encoder_weights=None, in_channels=1, classes=3))
    export_onnx(net, torch.zeros(1, 1, 64, 64), tmp_path / "m.onnx")
    nodes = [n.name for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    paths = onnx_scope_paths(net)
    written = set(paths.values())
    scopes = {n.rsplit("/", 1)[0] + "/" for n in nodes if n.startswith("/")}
    assert len(scopes) > 50
    # a module called twice gets '_1' on its second scope ('relu_1'): the same module path
    assert [s for s in scopes if s not in written and re.sub(r"_\d+/$", "/", s) not in written] == []
    pattern = r"/net/decoder/blocks\.0/"
    matched_nodes = [n for n in nodes if re.match(pattern, n)]
    selected = float_module_names(net, transformer=False, float_layers=(pattern,))
    assert len(matched_nodes) >= 3 and "net.decoder.blocks.0" in selected
    assert all(n.startswith("net.decoder.blocks.0") for n in selected)
    assert all(any(n.startswith(paths[m]) for m in selected) for n in matched_nodes)
    assert paths["net.decoder.blocks.0.conv1.0"] == "/net/decoder/blocks.0/conv1/conv1.0/"


# --- the model's device, TF32, the cache key's inputs --------------------------------------------------------


@pytest.mark.parametrize("precision", ["float16", "int8"])
def test_tensorrt_for_a_model_on_the_cpu_falls_back_saying_its_device_is_not_cuda(tmp_path, monkeypatch, precision):
    monkeypatch.setattr(backends, "cuda_available", lambda: True)  # a GPU is there, but the model is on the CPU
    monkeypatch.setattr(backends, "cuda_capability", lambda device="cuda": (9, 0))
    out = prepare_runtime(_runtime(tmp_path, "tensorrt", precision), _request(), device="cpu")
    assert (out.backend, out.forward) == ("torch", None)
    assert out.note == (
        f"float32 torch serves: tensorrt/{precision} unavailable: tensorrt runs on a CUDA device and this model's "
        "device is cpu"
    )


@pytest.mark.parametrize("tf32", [True, False])
def test_tensorrt_float32_follows_the_tf32_setting_and_builds_on_the_models_device(tf32):
    from cxr_serving.runtimes.backends import tensorrt_compile_options

    options = tensorrt_compile_options("float32", tf32=tf32, device="cuda:1")
    assert options["disable_tf32"] is (not tf32) and options["device"] == torch.device("cuda:1")
    assert "enable_autocast" not in options
    half = tensorrt_compile_options("float16", tf32=tf32, device="cuda")
    assert half["enable_autocast"] is True and half["autocast_low_precision_type"] is torch.float16


def test_the_models_device_hands_performance_tf32_on_to_the_runtime():
    assert InferenceDevice.resolve("cpu", PerformanceConfig(tf32=False)).tf32 is False
    assert InferenceDevice.resolve("cpu", PerformanceConfig()).tf32 is True


def test_the_tensorrt_cache_key_follows_tf32_and_the_cpu_backends_keys_do_not(tmp_path):
    runtime, request = _runtime(tmp_path, "tensorrt", "float32"), _request()
    on = cache_key(runtime, request, _VersionedTensorRt("float32", device="cuda", tf32=True), [])
    off = cache_key(runtime, request, _VersionedTensorRt("float32", device="cuda", tf32=False), [])
    assert on != off
    cpu = _runtime(tmp_path, "onnxruntime", "float32")
    assert cache_key(cpu, request, OnnxRuntimeBackend("float32", tf32=True), []) == cache_key(
        cpu, request, OnnxRuntimeBackend("float32", tf32=False), []
    )


def test_the_tensorrt_cache_key_follows_the_tensorrt_librarys_version(tmp_path, monkeypatch):
    """With stand-in `torch_tensorrt` and `tensorrt` modules (neither is installed here): their versions, and
    the named device's GPU, go into the key."""
    import sys
    import types

    names: list[object] = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names.append(device) or "NVIDIA H200")
    monkeypatch.setitem(sys.modules, "torch_tensorrt", types.SimpleNamespace(__version__="2.14.0"))
    runtime, request = _runtime(tmp_path, "tensorrt", "float16"), _request()
    keys = []
    for version in ("11.1.0", "11.2.0"):
        monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
        backend = TensorRtBackend("float16", device="cuda:1")
        assert backend.versions()["tensorrt"] == version
        keys.append(cache_key(runtime, request, backend, []))
    assert keys[0] != keys[1] and names[-1] == torch.device("cuda:1")


def test_a_failure_computing_the_cache_key_is_named_as_such(tmp_path, monkeypatch):
    class _NoVersions(OnnxRuntimeBackend):
        def versions(self):
            raise RuntimeError("no version to read")

    monkeypatch.setitem(backends.BACKENDS, "onnxruntime", _NoVersions)
    out = prepare_runtime(_runtime(tmp_path), _request())
    assert out.note == "float32 torch serves: onnxruntime/float32 failed at cache key: RuntimeError: no version to read"


# --- the cache never grows with failures -----------------------------------------------------------------------


def test_an_export_that_cannot_load_leaves_nothing_behind_over_three_starts(tmp_path, monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, "onnxruntime", _TruncatedExport)
    for _ in range(3):
        out = prepare_runtime(_runtime(tmp_path), _request())
        assert "failed at load" in out.note
        assert sorted(p.name for p in (tmp_path / "cache" / "trt-test").iterdir()) == []


def test_a_cached_artefact_that_stops_loading_is_moved_aside_and_only_the_newest_aside_kept(tmp_path):
    first = prepare_runtime(_runtime(tmp_path), _request())
    folder = first.cache_path
    assert first.backend == "onnxruntime" and folder is not None
    for stamp in ("20000101T000000-1", "20000102T000000-2"):  # two older starts' moved-aside artefacts
        folder.with_name(f"{folder.name}.unloadable-{stamp}").mkdir()
    (folder / "model.onnx").write_bytes(b"\x08\x07damaged on disk")
    out = prepare_runtime(_runtime(tmp_path), _request())
    assert out.backend == "onnxruntime" and out.exported
    asides = [p for p in folder.parent.iterdir() if ".unloadable-" in p.name]
    assert len(asides) == 1 and (asides[0] / "model.onnx").read_bytes() == b"\x08\x07damaged on disk"


def test_an_export_killed_midway_leaves_a_folder_the_next_export_removes(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from cxr_serving.runtimes.prepare import export_once

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    dead = tmp_path / f"abc.tmp-{host}-{gone.pid}"
    live = tmp_path / f"def.tmp-{host}-{os.getppid()}"  # the test runner's parent: alive, maybe exporting
    elsewhere = tmp_path / f"abc.tmp-another-pod-{gone.pid}"  # another host's pid: not ours to judge
    for d in (dead, live, elsewhere):
        d.mkdir()
        (d / "part").write_text("half")
    assert export_once(tmp_path / "key", lambda tmp: (tmp / "meta.json").write_text("{}"))
    assert not dead.exists() and live.is_dir() and elsewhere.is_dir() and (tmp_path / "key" / "meta.json").is_file()


@pytest.mark.skipif(importlib.util.find_spec("modelopt") is None, reason="nvidia-modelopt (requirements/gpu.txt)")
def test_a_modelopt_int8_network_exports_quantize_ops_before_the_convolution_and_none_before_the_head(monkeypatch):
    """What torch-tensorrt converts to Q/DQ pairs, checked on CPU: ModelOpt's export mode with its CPU fake
    quantization routed through `torch.ops.tensorrt.quantize_op` (its CUDA path) exports, with a dynamic batch
    1..4, a quantize_op before the convolution's input and weight and the pooling, and none before the Linear."""
    import modelopt.torch.quantization.tensor_quant as tensor_quant
    from modelopt.torch.quantization.utils import export_torch_mode

    from cxr_serving.runtimes.backends import modelopt_int8

    net = _net()
    modelopt_int8(net, list(torch.rand(8, 1, 32, 32)), transformer=False, float_layers=(), max_batch=4)

    def as_on_cuda(inputs, amax, num_bits=8, unsigned=False, narrow_range=True):
        return torch.ops.tensorrt.quantize_op(inputs, amax, num_bits, 0, unsigned, narrow_range)

    monkeypatch.setattr(tensor_quant, "_tensor_quant", as_on_cuda)
    batch = torch.export.Dim("batch", min=1, max=4)
    with export_torch_mode(), torch.no_grad():
        program = torch.export.export(net, (torch.rand(2, 1, 32, 32),), dynamic_shapes=({0: batch},))
    calls = {str(n.target): n for n in program.graph.nodes if n.op == "call_function"}

    def quantized(arg) -> bool:
        return getattr(arg, "target", None) == torch.ops.tensorrt.quantize_op.default

    conv, pool, head = (
        calls["aten.conv2d.default"],
        calls["aten.adaptive_avg_pool2d.default"],
        calls["aten.linear.default"],
    )
    assert quantized(conv.args[0]) and quantized(conv.args[1]) and quantized(pool.args[0])
    assert not any(quantized(a) for a in head.args)
    assert sum(quantized(n) for n in program.graph.nodes) == 3
    assert [(int(r.lower), int(r.upper)) for r in program.range_constraints.values()] == [(1, 4)]
