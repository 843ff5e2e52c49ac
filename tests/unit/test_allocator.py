"""performance.cpu_heap_pad_mb: freed forward memory is reused instead of page-faulted back in."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap

import pytest

from cxr_serving.optimize import allocator

pytestmark = pytest.mark.skipif(not allocator.libc_is_glibc(), reason="the heap settings are glibc's")

# Forwards of a small CNN at batch 8 on one of the model's threads, as the service runs them (its
# activations are 9-38 MB each). Page faults are counted per forward after two warm-up forwards.
# The steady state is the median forward: in about 1 run in 10 the first measured forward still
# grows the heap by one activation (9 216 pages, once; kept like the rest from then on), so the
# warm-up is not always complete after two forwards. glibc's defaults fault the activations in again,
# every forward on some hosts and in bursts on others.
_CHILD = textwrap.dedent(
    """
    import json, resource, sys, threading
    import torch
    from cxr_serving.device import InferenceDevice
    from cxr_serving.settings import PerformanceConfig

    InferenceDevice.resolve("cpu", PerformanceConfig(cpu_heap_pad_mb=int(sys.argv[1]), cpu_threads=1))
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
    ).eval()
    x = torch.randn(8, 3, 384, 384)
    faults = []

    def forwards():
        with torch.inference_mode():
            for i in range(12):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                net(x)
                if i >= 2:
                    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    t = threading.Thread(target=forwards)
    t.start()
    t.join()
    print(json.dumps(faults))
    """
)
PAGES_PER_FORWARD = (8 * 8 * 384 * 384 * 4 * 2) // 4096  # the two full-size activations, in 4 KiB pages


def _faults_per_forward(pad_mb: int) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(pad_mb)], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_forward_memory_is_reused_instead_of_faulted_back() -> None:
    untouched = _faults_per_forward(0)
    kept = _faults_per_forward(256)
    # glibc's defaults fault activations back in again and again: on some hosts every forward, on others
    # (a dynamic mmap threshold) in bursts; either way more than two forwards' worth over the ten
    assert sum(untouched) > 2 * PAGES_PER_FORWARD, f"glibc's defaults fault them back: {untouched}"
    assert statistics.median(kept) < PAGES_PER_FORWARD // 100, f"with the heap kept, faults per forward: {kept}"
    # at most one activation's worth grown across the ten forwards, against ~2 forwards' worth every forward
    assert sum(kept) < PAGES_PER_FORWARD, f"with the heap kept, faults per forward: {kept}"


def test_zero_leaves_glibc_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *_: pytest.fail("mallopt must not be called"))
    assert allocator.keep_freed_memory(0) is False


def test_other_c_libraries_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_applied_pad_mb", None)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *_: pytest.fail("mallopt must not be called"))
    assert allocator.keep_freed_memory(256) is False


def test_pad_is_bounded() -> None:
    with pytest.raises(ValueError, match="pad_mb"):
        allocator.keep_freed_memory(4096)


def test_setting_bounds() -> None:
    from pydantic import ValidationError

    from cxr_serving.settings import PerformanceConfig

    assert PerformanceConfig().cpu_heap_pad_mb == 256
    with pytest.raises(ValidationError):
        PerformanceConfig(cpu_heap_pad_mb=4096)
    with pytest.raises(ValidationError):
        PerformanceConfig(cpu_heap_pad_mb=-1)
