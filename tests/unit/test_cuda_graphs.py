"""performance.cuda_graphs: forwards replayed as CUDA graphs, one per input shape, with an eager fallback.

The CPU tests cover the settings and the wrapper's pass-through; the GPU tests (skipped without CUDA, run by
bench/gpu_session.sh on a lent GPU) record, replay and fall back for real."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from cxr_serving.amp import precision_of, with_autocast
from cxr_serving.cuda_graphs import graph_class, unwrapped, with_cuda_graphs
from cxr_serving.device import InferenceDevice
from cxr_serving.settings import PerformanceConfig


def gpu_only(fn):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(fn))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).eval()


def _device(**kw) -> InferenceDevice:
    base = dict(use_amp=False, amp_dtype="bfloat16", channels_last=True, compile=False, cuda_graphs=True)
    return InferenceDevice(**{"device": "cuda", **base, **kw})


def test_setting_defaults_on_and_applies_to_gpus_only() -> None:
    assert PerformanceConfig().cuda_graphs is True
    assert InferenceDevice.resolve("cpu", PerformanceConfig()).cuda_graphs is False


def test_cpu_inputs_pass_through_the_wrapper() -> None:
    net = _cnn()
    wrapped = _device(device="cpu").prepare(net)
    assert isinstance(wrapped, graph_class()) and unwrapped(wrapped) is net
    x = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(wrapped(x), net(x))
    assert wrapped.graph_count == 0


def test_precision_is_read_through_the_wrapper() -> None:
    autocast, _ = with_autocast(_cnn(), "cpu", torch.bfloat16)
    assert precision_of(with_cuda_graphs(autocast)) == "bfloat16"
    assert precision_of(with_cuda_graphs(_cnn())) == "float32"


def test_gpu_warm_up_covers_every_batch_size() -> None:
    assert _device().warmup_batch_sizes(4, 1) == [1, 2, 3, 4]
    assert _device(device="cpu").warmup_batch_sizes(4, 2) == [1]
    assert _device().warmup_batch_sizes(4, 0) == []


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "bf16"])
@gpu_only
def test_replays_answer_like_eager_per_batch_size(amp: bool) -> None:
    dev = InferenceDevice.resolve("cuda", PerformanceConfig(use_amp=amp, tf32=False))
    assert dev.cuda_graphs
    net = _cnn().cuda()
    model = dev.prepare(net, example=torch.rand(1, 3, 32, 32))
    assert isinstance(model, graph_class())
    eager = unwrapped(model)
    kept = []
    with dev.inference():
        for size in (1, 3, 8, 3, 1):
            x = dev.batch_to_device(torch.rand(size, 3, 32, 32))
            out = model(x)
            kept.append((out, eager(x)))
    assert model.graph_count == 3 and model.disabled_reason is None
    for out, ref in kept:  # each answer is a copy: later replays did not overwrite it
        assert torch.allclose(out.float(), ref.float(), atol=1e-5)


class _HostSync(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if bool(x.sum() > 0) else x  # reads a value back to the host: cannot be recorded


class _Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + 1, x - 1


@pytest.mark.parametrize(("net", "why"), [(_HostSync(), "recording failed"), (_Pair(), "not one tensor")])
@gpu_only
def test_networks_that_cannot_be_recorded_are_served_eagerly(net: nn.Module, why: str, caplog) -> None:
    model = with_cuda_graphs(net)
    x = torch.rand(2, 3, device="cuda")
    with torch.inference_mode():
        first, again = model(x), model(x)
    assert why in (model.disabled_reason or "") and why in caplog.text
    assert model.graph_count == 0
    expected = net(x)
    for got in (first, again):
        got, want = (got, expected) if isinstance(got, torch.Tensor) else (got[0], expected[0])
        assert torch.equal(got, want)


@gpu_only
def test_replay_is_faster_than_launching_from_python() -> None:
    """A launch-bound network (200 tiny kernels): side by side, the replay beats eager by far."""
    net = nn.Sequential(*[nn.Linear(64, 64) for _ in range(200)]).cuda().eval()
    model = with_cuda_graphs(net)
    x = torch.rand(4, 64, device="cuda")

    def per_call(fn) -> float:
        fn(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            fn(x)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / 50

    with torch.inference_mode():
        eager_s, graph_s = per_call(net), per_call(model)
    assert graph_s * 2 < eager_s, (eager_s, graph_s)
