"""Soak: every real service as its own process under a steady mixed load (real NIH PNGs and
DICOMs, some invalid inputs; rag searches and extractive answers) for CXR_SOAK_SECONDS (CI: 60 s;
the release check runs 600). Promise: no unexpected error (only OK, and INVALID_ARGUMENT for the
inputs that are invalid on purpose) and RSS growth after warm-up under 64 MB per service."""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import ExitStack

import grpc
import pytest

from tests.support.load import Outcomes
from tests.support.paths import cxr14_images, dicom_files
from tests.support.results import report
from tests.support.servers import auth
from tests.support.service_process import service_process
from tests.support.targets import Call, Target, available_targets

SOAK_SECONDS = float(os.environ.get("CXR_SOAK_SECONDS", "60"))
RSS_GROWTH_BOUND_MB = 64


def image_inputs() -> list[tuple[bytes, str, bool]]:
    """(bytes, content type, valid?) in rotation."""
    good = [(p.read_bytes(), "image/png", True) for p in cxr14_images(4)]
    good += [(p.read_bytes(), "application/dicom", True) for p in dicom_files()[:3]]
    bad = [(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "image/png", False), (b"text", "", False)]
    return good + bad


def rag_calls() -> list[Call]:
    from cxr_protos.rag.v1 import rag_service_pb2 as pb

    return [
        Call("SearchLiterature", pb.SearchLiteratureRequest(query="pneumothorax after chest tube removal", top_k=3)),
        Call("AnswerQuestion", pb.AnswerQuestionRequest(question="Does helicopter transport impair intubation?")),
        Call("SearchLiterature", pb.SearchLiteratureRequest(query="cardiomegaly on chest radiograph", mode=2)),
    ]


def drive(target: Target, port: int, out: Outcomes, stop: threading.Event, deadline: float) -> None:
    inputs = image_inputs() if target.image_input else [(b"", "", True)]
    calls = rag_calls() if not target.image_input else []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = target.stub(ch)
        i = 0
        while not stop.is_set() and time.monotonic() < deadline:
            data, ctype, valid = inputs[i % len(inputs)]
            call = calls[i % len(calls)] if calls else target.valid(data, ctype)
            i += 1
            started = time.perf_counter()
            try:
                getattr(stub, call.method)(call.request, metadata=auth(), timeout=60)
                out.record(grpc.StatusCode.OK if valid else grpc.StatusCode.UNKNOWN, time.perf_counter() - started)
            except grpc.RpcError as err:
                code = err.code()
                expected = not valid and code == grpc.StatusCode.INVALID_ARGUMENT
                out.record(grpc.StatusCode.OK if expected else code, time.perf_counter() - started, err.details() or "")


@pytest.mark.slow
def test_soak_mixed_load_all_services(tmp_path):
    targets = available_targets(include_toy=False)
    if not targets:
        pytest.skip("no real service importable")
    envs = {}
    for t in targets:
        env = dict(t.process_env)
        if t.name == "rag":
            from tests.support.rag import shared_store

            env["CXR_MODELS__RAG"] = json.dumps({"vector_db_path": str(shared_store()), "documents_path": None})
        envs[t.name] = {**env, "CXR_LOG_LEVEL": "WARNING"}
    with ExitStack() as stack:
        procs = {
            t.name: stack.enter_context(service_process(tmp_path, module=t.module, service=t.service, env=envs[t.name]))
            for t in targets
        }
        outcomes = {t.name: Outcomes() for t in targets}
        stop = threading.Event()
        warm = time.monotonic() + 5
        threads = [
            threading.Thread(target=drive, args=(t, procs[t.name].port, outcomes[t.name], stop, warm), daemon=True)
            for t in targets
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        rss_start = {n: p.rss_bytes() for n, p in procs.items()}
        deadline = time.monotonic() + SOAK_SECONDS
        samples: dict[str, list[int]] = {n: [] for n in procs}
        threads = [
            threading.Thread(target=drive, args=(t, procs[t.name].port, outcomes[t.name], stop, deadline), daemon=True)
            for t in targets
        ]
        for th in threads:
            th.start()
        while time.monotonic() < deadline:
            for n, p in procs.items():
                samples[n].append(p.rss_bytes())
            time.sleep(1)
        for th in threads:
            th.join(120)
        rss_end = {n: p.rss_bytes() for n, p in procs.items()}

    numbers = {
        "seconds": SOAK_SECONDS,
        "rss_growth_bound_mb": RSS_GROWTH_BOUND_MB,
        "services": {
            n: {
                "requests": o.total,
                "unexpected_errors": o.failed(),
                "codes": dict(o.codes),
                "p50_ms": o.percentile_ms("OK", 0.5),
                "p99_ms": o.percentile_ms("OK", 0.99),
                "rss_mb_after_warmup": rss_start[n] >> 20,
                "rss_mb_peak": max(samples[n] or [0]) >> 20,
                "rss_mb_end": rss_end[n] >> 20,
            }
            for n, o in outcomes.items()
        },
    }
    report("soak", numbers)
    for n, o in outcomes.items():
        assert o.failed() == 0, (n, o.errors)
        assert o.total > 10, (n, o.total)
        assert rss_end[n] - rss_start[n] < RSS_GROWTH_BOUND_MB << 20, numbers
