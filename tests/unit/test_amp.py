"""performance.use_amp on CPU (amp.py): autocast wrapper, the load-time check against float32, which
CPUs get it, the precision each model reports, and how far bfloat16 moves outputs on real radiographs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cxr_classification.config import BinaryClassifierConfig, MultiLabelClassifierConfig
from cxr_classification.model import ChestXrayClassifier
from cxr_segmentation.config import SegmentationConfig
from cxr_segmentation.model import SegmentationModel
from cxr_serving import device
from cxr_serving.device import InferenceDevice
from cxr_serving.images import decode_image
from cxr_serving.optimize import amp
from cxr_serving.optimize.amp import output_deviation, precision_of, with_autocast
from cxr_serving.settings import PerformanceConfig
from tests.support.classifiers import inputs as classifier_inputs
from tests.support.paths import cxr14_images

FP32 = InferenceDevice("cpu", use_amp=False, amp_dtype="bfloat16", channels_last=True, compile=False)
# Built directly (not resolve()): autocast gives the same numbers where bfloat16 is emulated, only slower.
BF16 = InferenceDevice("cpu", use_amp=True, amp_dtype="bfloat16", channels_last=True, compile=False)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()


def test_autocast_wrapper_runs_bf16_and_returns_float32() -> None:
    net, x = small_cnn(), torch.rand(2, 3, 16, 16)
    wrapped, deviation = with_autocast(net, "cpu", torch.bfloat16, example=x)
    assert wrapped is not net and precision_of(wrapped) == "bfloat16" and precision_of(net) == "float32"
    assert deviation is not None and 0 < deviation < 0.05  # bfloat16 really ran: the output moved, a little
    seen: list[torch.dtype] = []
    wrapped.inner[2].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    with torch.inference_mode():
        out = wrapped(x)
    assert seen == [torch.bfloat16] and out.dtype == torch.float32


def test_network_that_breaks_in_bf16_keeps_float32(caplog) -> None:
    # 1000 - 999 = 1 in float32; bfloat16 (8 significant bits) rounds 999 to 1000 and the difference to 0.
    net = nn.Linear(2, 1, bias=False).eval()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, -1.0]]))
    with caplog.at_level(logging.WARNING, logger="cxr_serving.optimize.amp"):
        kept, deviation = with_autocast(net, "cpu", torch.bfloat16, example=torch.tensor([[1000.0, 999.0]]))
    assert kept is net and precision_of(kept) == "float32" and deviation == pytest.approx(1.0)
    assert "serving float32" in caplog.text


def test_output_deviation_refuses_non_finite_and_changed_shapes() -> None:
    ref = torch.ones(2, 3)
    assert output_deviation(ref, ref * 1.01) == pytest.approx(0.01)
    assert output_deviation(ref * 10, ref * 10.5) == pytest.approx(0.05)  # relative to the output's scale
    assert output_deviation(ref, torch.full((2, 3), float("nan"))) == float("inf")
    assert output_deviation(ref, torch.ones(3, 2)) == float("inf")
    assert output_deviation({"out": ref}, (ref,)) == 0.0 and output_deviation([ref], [ref, ref]) == float("inf")


def test_resolve_turns_amp_on_only_where_the_cpu_has_native_bf16(monkeypatch, caplog) -> None:
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="cxr_serving.device"):
        assert not InferenceDevice.resolve("cpu", PerformanceConfig(use_amp=True)).use_amp
    assert "no native bfloat16" in caplog.text
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    dev = InferenceDevice.resolve("cpu", PerformanceConfig(use_amp=True, amp_dtype="float16", amp_tolerance=0.02))
    assert dev.use_amp and dev.amp_dtype == "bfloat16" and dev.amp_tolerance == 0.02  # float16 is a GPU setting
    assert not InferenceDevice.resolve("cpu", PerformanceConfig()).use_amp  # off unless asked


def test_native_bf16_query_agrees_with_the_cpu_flags() -> None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo")
    flags = set(next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), "").split())
    assert amp.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_amp_tolerance_is_validated() -> None:
    with pytest.raises(ValueError, match="amp_tolerance"):
        PerformanceConfig(amp_tolerance=0)


def test_prepare_without_example_wraps_unchecked() -> None:
    assert precision_of(BF16.prepare(small_cnn())) == "bfloat16"
    assert precision_of(FP32.prepare(small_cnn(), example=torch.rand(1, 3, 16, 16))) == "float32"


@pytest.mark.parametrize("cfg", [MultiLabelClassifierConfig, BinaryClassifierConfig], ids=["densenet", "swin"])
def test_classifier_bf16_probabilities_stay_close_on_real_radiographs(cfg) -> None:
    fp32 = ChestXrayClassifier("m", cfg(allow_untrained=True), FP32)
    bf16 = ChestXrayClassifier("m", cfg(allow_untrained=True), BF16)
    fp32.load()
    bf16.load()  # same seeded random weights
    assert (fp32.precision, bf16.precision) == ("float32", "bfloat16")
    items = classifier_inputs(fp32, 8)
    a = np.stack([o.probabilities for o in fp32.predict(items)])
    b = np.stack([o.probabilities for o in bf16.predict(items)])
    assert b.dtype == np.float32
    diff = np.abs(a - b).max()
    assert 0 < diff < 0.02, diff


def test_segmentation_bf16_masks_agree_on_real_radiographs() -> None:
    cfg = SegmentationConfig(allow_untrained=True)
    fp32, bf16 = SegmentationModel(cfg, FP32), SegmentationModel(cfg, BF16)
    fp32.load()
    bf16.load()
    assert (fp32.precision, bf16.precision) == ("float32", "bfloat16")
    batch = [fp32.preprocess(decode_image(p.read_bytes()).pixels) for p in cxr14_images(6)]
    a, b = torch.stack(list(fp32.predict(batch))), torch.stack(list(bf16.predict(batch)))
    assert b.dtype == torch.float32
    agree = ((a > 0) == (b > 0)).float().mean().item()  # masks at the default threshold 0.5
    assert 0.99 < agree < 1.0, agree


def test_weights_are_cast_at_load_when_that_changes_nothing() -> None:
    net, x = small_cnn(), torch.rand(2, 3, 16, 16)
    wrapped, _ = with_autocast(net, "cpu", torch.bfloat16, example=x)
    assert wrapped.inner is not net and wrapped.inner[0].weight.dtype == torch.bfloat16
    assert net[0].weight.dtype == torch.float32  # the caller's network is untouched
    per_forward, _ = with_autocast(net, "cpu", torch.bfloat16)  # no example: autocast casts each forward
    assert per_forward.inner is net
    with torch.inference_mode():
        assert torch.equal(wrapped(x), per_forward(x))


class WeightStandardizedConv(nn.Conv2d):
    """Uses its weight outside the convolution (as timm's StdConv2d): not cast at load."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


def test_subclassed_layers_keep_float32_weights() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(WeightStandardizedConv(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    wrapped, _ = with_autocast(net, "cpu", torch.bfloat16, example=torch.rand(1, 3, 8, 8))
    assert wrapped.inner[0].weight.dtype == torch.float32 and wrapped.inner[2].weight.dtype == torch.bfloat16
