"""performance.cuda_graphs: forwards replayed as CUDA graphs, one per input shape, with an eager fallback.

The CPU tests cover the settings and the wrapper's pass-through; the GPU tests (skipped without CUDA, run by
bench/gpu/gpu_session.sh on a lent GPU) record, replay and fall back for real."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from cxr_serving.device import InferenceDevice
from cxr_serving.optimize.amp import precision_of, with_autocast
from cxr_serving.optimize.cuda_graphs import graph_class, unwrapped, with_cuda_graphs
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
    assert _device().warmup_batch_sizes(4, 1) == [4, 3, 2, 1]  # largest first: graphs share a pool
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


@gpu_only
def test_network_returning_a_tuple_is_served_eagerly(caplog) -> None:
    net = _Pair()
    model = with_cuda_graphs(net)
    x = torch.rand(2, 3).cuda()
    with torch.inference_mode():
        first, again = model(x), model(x)
    assert "not one tensor" in (model.disabled_reason or "") and "not one tensor" in caplog.text
    assert model.graph_count == 0
    for got in (first, again):
        assert torch.equal(got[0], x + 1) and torch.equal(got[1], x - 1)


# A recording that fails inside the capture leaves PyTorch's CUDA generator marked as capturing (every
# later torch.rand on the GPU raises "Offset increment outside graph capture": seen on an H200), so
# this case runs in a process of its own.
_HOST_SYNC_CHILD = """
import json, logging, torch
from torch import nn
from cxr_serving.optimize.cuda_graphs import with_cuda_graphs

class HostSync(nn.Module):
    def forward(self, x):
        return x * 2 if bool(x.sum() > 0) else x  # reads a value back to the host: cannot be recorded

logging.basicConfig(level=logging.WARNING)
model = with_cuda_graphs(HostSync())
x = torch.rand(2, 3).cuda() + 0.1
with torch.inference_mode():
    outs = [model(x), model(x)]
print(json.dumps({"reason": model.disabled_reason, "graphs": model.graph_count,
                  "correct": all(torch.equal(o, x * 2) for o in outs)}))
"""


@gpu_only
def test_network_that_syncs_with_the_host_is_served_eagerly() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _HOST_SYNC_CHILD], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "recording failed" in (result["reason"] or "") and "without CUDA graphs" in out.stderr
    assert result["graphs"] == 0 and result["correct"] is True


@gpu_only
def test_replay_is_faster_than_launching_from_python() -> None:
    """A launch-bound network (200 tiny kernels): side by side, the replay beats eager by far."""
    net = nn.Sequential(*[nn.Linear(64, 64) for _ in range(200)]).cuda().eval()
    model = with_cuda_graphs(net)
    x = torch.rand(4, 64).cuda()

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
