"""InferenceDevice on CPU: channels_last applies (oneDNN NHWC convolutions), the thread count is configurable."""

from __future__ import annotations

import shutil

import pytest
import torch

from cxr_serving.device import InferenceDevice
from cxr_serving.settings import PerformanceConfig


def test_channels_last_applies_on_cpu() -> None:
    dev = InferenceDevice.resolve("cpu", PerformanceConfig())
    assert dev.channels_last and not dev.is_cuda and not dev.use_amp and not dev.compile
    conv = dev.prepare(torch.nn.Conv2d(3, 4, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    batch = dev.batch_to_device(torch.rand(2, 3, 8, 8))
    assert batch.is_contiguous(memory_format=torch.channels_last)
    with dev.inference():
        assert torch.allclose(
            conv(batch), torch.nn.functional.conv2d(batch.contiguous(), conv.weight, conv.bias), atol=1e-5
        )


def test_channels_last_can_be_turned_off() -> None:
    dev = InferenceDevice.resolve("cpu", PerformanceConfig(channels_last=False))
    assert not dev.channels_last
    assert dev.batch_to_device(torch.rand(2, 3, 8, 8)).is_contiguous()


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpu_threads_sets_torch_intra_op_threads(restore_threads) -> None:
    InferenceDevice.resolve("cpu", PerformanceConfig(cpu_threads=1))
    assert torch.get_num_threads() == 1


def test_cpu_threads_default_leaves_torch_alone(restore_threads) -> None:
    torch.set_num_threads(2)
    InferenceDevice.resolve("cpu", PerformanceConfig())
    assert torch.get_num_threads() == 2


def test_cpu_threads_is_validated() -> None:
    with pytest.raises(ValueError, match="cpu_threads"):
        PerformanceConfig(cpu_threads=0)


def test_compile_mode_is_typed_and_resolved() -> None:
    from pydantic import ValidationError

    assert PerformanceConfig().compile_mode == "default"
    with pytest.raises(ValidationError):
        PerformanceConfig(compile_mode="fastest")
    perf = PerformanceConfig(compile_models=True, compile_mode="reduce-overhead")
    assert InferenceDevice.resolve("cpu", perf).compile is False  # a GPU path
    assert InferenceDevice.resolve("cpu", perf).compile_mode == "reduce-overhead"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="inductor's CPU code needs a C++ compiler")
def test_compiled_network_serves_every_batch_size_from_one_graph() -> None:
    """The batcher forms every size up to max_batch_size: a graph per size would recompile on each new
    size and fall back to eager after dynamo's recompile limit."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    dev = InferenceDevice("cpu", use_amp=False, amp_dtype="bfloat16", channels_last=True, compile=True)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    ).eval()
    model = dev.prepare(net)
    assert model is not net and getattr(model, "_orig_mod", None) is net
    with torch.inference_mode():
        for size in (2, 3, 5, 9):
            x = torch.rand(size, 3, 16, 16)
            assert torch.allclose(model(dev.batch_to_device(x)), net(x), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


def test_stack_to_device_on_cpu_is_a_plain_stack() -> None:
    """On CPU stack_to_device is torch.stack (no staging): the same values, a new tensor."""
    import torch

    from cxr_serving.device import InferenceDevice
    from cxr_serving.settings import PerformanceConfig

    dev = InferenceDevice.resolve("cpu", PerformanceConfig(use_amp=False))
    items = [torch.rand(1, 8, 8) for _ in range(3)]
    batch = dev.stack_to_device(items)
    assert torch.equal(batch, torch.stack(items)) and batch.shape == (3, 1, 8, 8)
    assert batch.data_ptr() not in {t.data_ptr() for t in items}


def test_stack_on_host_matches_torch_stack_and_starts_no_intra_op_threads(tmp_path) -> None:
    """A batch assembled on the host equals torch.stack's, into a new tensor or into `out`, and is copied by the
    calling thread alone: in a fresh process with two torch threads it starts no worker threads, where torch.stack
    does (the control, so this can fail): torch's workers spin after each copy, taking cores from decoding."""
    import subprocess
    import sys

    import numpy as np
    import torch

    from cxr_serving.device import stack_on_host

    items = [torch.from_numpy(np.random.default_rng(i).random((1, 64, 64), dtype=np.float32)) for i in range(5)]
    assert torch.equal(stack_on_host(items), torch.stack(items))
    out = torch.empty(5, 1, 64, 64)
    assert stack_on_host(items, out=out) is out and torch.equal(out, torch.stack(items))
    halves = [t.to(torch.bfloat16) for t in items]  # numpy has no bfloat16: torch.stack's path
    assert torch.equal(stack_on_host(halves), torch.stack(halves))
    resized = torch.empty(4, 1, 64, 64)  # torch.stack's own handling of an `out` of another shape
    with pytest.warns(UserWarning, match="resized"):
        assert torch.equal(stack_on_host(items, out=resized), torch.stack(items))
    grads = [t.clone().requires_grad_() for t in items[:2]]
    assert stack_on_host(grads).requires_grad  # as torch.stack: the grad is kept, not detached
    negs = [torch.complex(t, t).conj().imag for t in items[:2]]  # the negative bit set
    assert torch.equal(stack_on_host(negs), torch.stack(negs))
    chw = [torch.from_numpy(np.ones((8, 8, 3), np.float32)).permute(2, 0, 1) for _ in range(2)]  # HWC data, CHW view
    assert stack_on_host(chw).is_contiguous() and torch.equal(stack_on_host(chw), torch.stack(chw))
    scalars = [torch.tensor(1.0), torch.tensor(2.0)]  # 0-dim
    assert torch.equal(stack_on_host(scalars, out=torch.empty(2)), torch.tensor([1.0, 2.0]))
    odd = [*items[:2], torch.zeros(64, 64)]  # numpy would broadcast it into `out`; torch.stack refuses
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        stack_on_host(odd, out=torch.empty(3, 1, 64, 64))
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        stack_on_host(odd)
    mixed = [items[0], items[1].double()]  # torch.stack promotes; numpy's copy would not be asked to
    assert torch.equal(stack_on_host(mixed), torch.stack(mixed)) and stack_on_host(mixed).dtype == torch.float64
    probe = (
        "import os, sys, numpy as np, torch\n"
        "from cxr_serving.device import stack_on_host\n"
        "torch.set_num_threads(2)\n"
        "items = [torch.from_numpy(np.ones((1, 224, 224), np.float32)) for _ in range(32)]\n"
        "threads = lambda: len(os.listdir('/proc/self/task'))\n"
        "before = threads()\n"
        "for _ in range(5): stack_on_host(items)\n"
        "ours = threads()\n"
        "for _ in range(5): torch.stack(items)\n"
        "print(before, ours, threads())\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    before, ours, after_torch = (int(x) for x in done.stdout.split())
    assert ours == before, done.stdout
    assert after_torch > before, done.stdout  # the control: torch.stack did start workers here
