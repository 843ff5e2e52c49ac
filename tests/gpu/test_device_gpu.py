"""InferenceDevice on a CUDA device (skipped without one): torch.compile's modes answer like eager."""

from __future__ import annotations

import pytest
import torch

from cxr_serving.device import InferenceDevice
from cxr_serving.settings import PerformanceConfig
from tests.support.cuda import NEEDS_CUDA

pytestmark = NEEDS_CUDA


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_modes_on_gpu_answer_like_eager(mode: str) -> None:
    dev = InferenceDevice.resolve(
        "cuda", PerformanceConfig(compile_models=True, compile_mode=mode, tf32=False, use_amp=False)
    )
    assert dev.compile and dev.compile_mode == mode
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    ).eval()
    eager = torch.nn.Sequential(*[m for m in net]).cuda()  # the same parameters, moved once
    model = dev.prepare(net)
    with dev.inference():
        for size in (1, 2, 5, 2):  # CUDA graphs replay per size; results are read before the next call
            x = torch.rand(size, 3, 32, 32).cuda()
            assert torch.allclose(model(dev.batch_to_device(x)).float().cpu(), eager(x).cpu(), atol=1e-4)


def test_stack_to_device_equals_a_plain_stack_and_never_overwrites_a_copy_in_flight() -> None:
    """Batches staged through this thread's page-locked buffer arrive bit-equal to torch.stack(...).cuda(), also
    when the next batch is staged before the last one's copy was waited for, and when a batch outgrows the
    buffer; a second thread has its own buffer."""
    import threading

    dev = InferenceDevice.resolve("cuda", PerformanceConfig(use_amp=False))
    rounds = [[torch.rand(1, 224, 224) for _ in range(n)] for n in (8, 8, 32, 3, 64)]
    batches = []
    for items in rounds:  # no synchronisation in between; the stream is held busy before each copy, so without
        torch.cuda._sleep(50_000_000)  # the event's wait the next batch would overwrite a copy not yet made
        batches.append(dev.stack_to_device(items))
    for items, batch in zip(rounds, batches, strict=True):
        assert batch.is_cuda
        assert torch.equal(batch.cpu(), torch.stack(items))
    other: list[torch.Tensor] = []
    items = [torch.rand(1, 224, 224) for _ in range(4)]
    from cxr_serving.device import _staging

    mine = {key: held[0].data_ptr() for key, held in _staging.buffers.items()}
    theirs: list[dict[object, int]] = []

    def in_thread() -> None:
        other.append(dev.stack_to_device(items))
        theirs.append({key: held[0].data_ptr() for key, held in _staging.buffers.items()})

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert torch.equal(other[0].cpu(), torch.stack(items))
    assert mine and theirs[0] and not set(mine.values()) & set(theirs[0].values())  # its own buffer
