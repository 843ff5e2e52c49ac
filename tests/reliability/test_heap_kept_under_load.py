"""A loaded service does not keep faulting back in the heap it keeps for its forwards (`performance.cpu_heap_pad_mb`).

protobuf's upb runtime calls glibc's `malloc_trim(0)` once per 10,000 message-arena blocks it frees, and a trim
hands every free page of the heap back to the kernel; the next forwards then fault each page in again. A response
built from one standalone message per finding, model and timing freed ~30 blocks per call, so a busy service
trimmed every ~300 calls; built in one arena it frees ~10 (docs/serving-runtime.md). Page faults are counted per
4 KiB page only where transparent huge pages are not forced on, and the trim is glibc's: elsewhere this is skipped."""

from __future__ import annotations

import json
import os
import platform
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import grpc
import pytest

from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_protos.common.v1 import common_pb2
from tests.support.paths import cxr14_images
from tests.support.servers import auth
from tests.support.service_process import service_process

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim and the kept heap are glibc's"),
    pytest.mark.skipif(THP.exists() and "[always]" in THP.read_text(), reason="faults would count 2 MiB pages"),
]

CALLS = 1500
CONCURRENCY = 8
MAX_FAULTS_PER_CALL = 25  # measured at 4508dc8: 6.6-8.5 in one arena; 31-35 with one message per part (3b8b3a5)
ALLOCATOR_ENV = ("LD_PRELOAD", "GLIBC_TUNABLES")  # another allocator or glibc's tuning would hide the trims
INHERITED_SETTINGS = ("MALLOC_", "CXR_PERFORMANCE__", "CXR_SERVER_CONFIG__", "CXR_MODELS__", "CXR_CONFIG_PATH")


def minor_faults(pid: int) -> int:
    """Minor page faults of the whole process so far (/proc/<pid>/stat, field 10)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def test_a_loaded_service_takes_at_most_25_minor_page_faults_per_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cheap = {"architecture": "timm", "timm_name": "mobilenetv3_small_050", "allow_untrained": True, "input_size": 224}
    config = {
        "models": {"multiclass_classifier": cheap},
        "performance": {"warmup_batches": 0, "cpu_threads": 1, "cpu_heap_pad_mb": 256},
        "server_config": {"device": "cpu", "frontend_processes": 1, "max_batch_size": 8, "max_batch_delay_ms": 5},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    data = [p.read_bytes() for p in cxr14_images(8)]
    for name in [n for n in os.environ if n in ALLOCATOR_ENV or n.startswith(INHERITED_SETTINGS)]:
        monkeypatch.delenv(name)  # the service process inherits this environment, and variables beat the file
    env = {"CXR_CONFIG_PATH": str(path), "HF_HUB_OFFLINE": "1"}
    with service_process(tmp_path, "cxr_classification", env=env) as sp, grpc.insecure_channel(sp.target) as ch:
        stub = pb_grpc.ClassificationServiceStub(ch)

        def call(i: int) -> None:
            image = common_pb2.Image(data=data[i % len(data)], content_type="image/png")
            stub.ClassifyImage(pb.ClassifyImageRequest(image=image), metadata=auth(), timeout=60)

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            done, _ = wait([pool.submit(call, i) for i in range(200)], timeout=120)  # warm: heap at its size
            assert all(f.exception() is None for f in done) and len(done) == 200
            before = minor_faults(sp.proc.pid)
            done, pending = wait([pool.submit(call, i) for i in range(CALLS)], timeout=300)
            after = minor_faults(sp.proc.pid)
        assert not pending and all(f.exception() is None for f in done)
    per_call = (after - before) / CALLS
    print(f"minor faults per call: {per_call:.1f}")
    assert per_call <= MAX_FAULTS_PER_CALL, per_call
