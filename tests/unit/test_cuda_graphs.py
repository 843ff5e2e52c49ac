"""performance.cuda_graphs: forwards replayed as CUDA graphs, one per input shape, with an eager fallback.

These CPU tests cover the settings and the wrapper's pass-through; tests/gpu/test_cuda_graphs_gpu.py (skipped
without CUDA, run by bench/gpu/gpu_session.sh on a lent GPU) records, replays and falls back for real."""

from __future__ import annotations

import torch

from cxr_serving.device import InferenceDevice
from cxr_serving.optimize.amp import precision_of, with_autocast
from cxr_serving.optimize.cuda_graphs import graph_class, unwrapped, with_cuda_graphs
from cxr_serving.settings import PerformanceConfig
from tests.support.networks import small_cnn


def _device(**kw) -> InferenceDevice:
    base = dict(use_amp=False, amp_dtype="bfloat16", channels_last=True, compile=False, cuda_graphs=True)
    return InferenceDevice(**{"device": "cuda", **base, **kw})


def test_setting_defaults_on_and_applies_to_gpus_only() -> None:
    assert PerformanceConfig().cuda_graphs is True
    assert InferenceDevice.resolve("cpu", PerformanceConfig()).cuda_graphs is False


def test_cpu_inputs_pass_through_the_wrapper() -> None:
    net = small_cnn()
    wrapped = _device(device="cpu").prepare(net)
    assert isinstance(wrapped, graph_class()) and unwrapped(wrapped) is net
    x = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(wrapped(x), net(x))
    assert wrapped.graph_count == 0


def test_precision_is_read_through_the_wrapper() -> None:
    autocast, _ = with_autocast(small_cnn(), "cpu", torch.bfloat16)
    assert precision_of(with_cuda_graphs(autocast)) == "bfloat16"
    assert precision_of(with_cuda_graphs(small_cnn())) == "float32"


def test_gpu_warm_up_covers_every_batch_size() -> None:
    assert _device().warmup_batch_sizes(4, 1) == [4, 3, 2, 1]  # largest first: graphs share a pool
    assert _device(device="cpu").warmup_batch_sizes(4, 2) == [1]
    assert _device().warmup_batch_sizes(4, 0) == []
