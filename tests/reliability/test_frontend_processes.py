"""`server_config.frontend_processes: 2`: two frontend processes on one port feed one model executor.

Real service processes on 127.0.0.1, real NIH PNGs. Each channel here is its own TCP connection, and the
test reads from /proc which frontend accepted it, so it knows which requests each frontend carried."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from concurrent.futures import Future
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from cxr_classification.service import build_binding
from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_serving.grpc_errors import error_info
from tests.support.cuda import NEEDS_CUDA
from tests.support.frontends import child_pids, open_channel_on, scrape, total, wait_children
from tests.support.paths import cxr14_images
from tests.support.pki import make_pki
from tests.support.servers import auth, free_port, make_settings, running_server
from tests.support.service_process import ServiceProcess, service_process

SERVING = health_pb2.HealthCheckResponse.SERVING
CLASSIFY = "/cxr.classification.v1.ClassificationService/ClassifyImage"
IMAGES = [p.read_bytes() for p in cxr14_images(6)]


def request(i: int = 0) -> pb.ClassifyImageRequest:
    return pb.ClassifyImageRequest(image=common_pb2.Image(data=IMAGES[i % len(IMAGES)], content_type="image/png"))


def toy_env(metrics_port: int, delay_s: float, **extra: str) -> dict[str, str]:
    return {
        "TOY_DELAY_S": str(delay_s),
        "CXR_SERVER_CONFIG__FRONTEND_PROCESSES": "2",
        "CXR_SERVER_CONFIG__MAX_BATCH_SIZE": "32",
        "CXR_SERVICES__CLASSIFICATION__METRICS_PORT": str(metrics_port),
        **extra,
    }


def channels(sp: ServiceProcess, n: int, timeout: float = 60.0) -> tuple[list[grpc.Channel], list[int], list[int]]:
    """At least `n` channels, the frontend pid of each, and the frontends; both frontends get at least one
    (health answers SERVING once one frontend is up: the other may still be starting)."""
    frontends = wait_children(sp.proc.pid, 2)
    chans, owners = [], []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ch, pid = open_channel_on(sp.target, frontends)
        chans.append(ch)
        owners.append(pid)
        if len(chans) >= n and set(owners[-n:]) == set(frontends):
            for extra in chans[:-n]:
                extra.close()
            return chans[-n:], owners[-n:], frontends
        if len(chans) >= n:
            time.sleep(0.1)
    raise AssertionError(f"every connection went to one frontend for {timeout}s: {owners}")


def classify(ch: grpc.Channel, i: int, timeout: float = 30.0) -> Future[pb.ClassifyImageResponse]:
    return pb_grpc.ClassificationServiceStub(ch).ClassifyImage.future(request(i), metadata=auth(), timeout=timeout)


def wait_metric(port: int, name: str, want: float, timeout: float = 10.0, **labels: str) -> str:
    """Frontends push their metrics every second: wait until `name` sums to `want`."""
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(port)
        if total(text, name, **labels) == want or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)])
def test_two_frontends_answer_bit_equal_to_one_process(tmp_path: Path, device: str) -> None:
    """A real classifier (timm MobileNetV3-Small 0.5 at 64 px: quick to build; reproducible untrained weights):
    every probability that two frontends answer equals the single-process server's bit for bit, on the CPU and
    (`pytest -m gpu`, bench/gpu/run.sh) on CUDA; admin RPCs and their errors pass through the frontend to the
    executor; /metrics counts each frontend's requests."""
    cheap = {"architecture": "timm", "timm_name": "mobilenetv3_small_050", "allow_untrained": True, "input_size": 64}
    models = {"multiclass_classifier": cheap}
    performance = {"warmup_batches": 0, "trace_models": False, "fold_batchnorm": False}  # a quicker load
    config = {"models": models, "performance": performance, "server_config": {"max_batch_size": 8, "device": device}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    metrics_port = free_port()
    env = {
        "CXR_CONFIG_PATH": str(path),
        "CXR_SERVER_CONFIG__FRONTEND_PROCESSES": "2",
        "CXR_SERVICES__CLASSIFICATION__METRICS_PORT": str(metrics_port),
        "HF_HUB_OFFLINE": "1",
    }
    with service_process(tmp_path, "cxr_classification", env=env) as sp:
        chans, _, _ = channels(sp, 4)
        served = []
        for i in range(len(IMAGES)):  # one at a time: a batch of one in both servers
            ch = chans[i % len(chans)]
            served.append(classify(ch, i).result())
        listed = pb_grpc.ClassificationServiceStub(chans[0]).ListModels(pb.ListModelsRequest(), metadata=auth())
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.ClassificationServiceStub(chans[-1]).UnloadModel(
                pb.UnloadModelRequest(model_name="no_such_model"), metadata=auth()
            )
        assert sp.health() == SERVING
        text = wait_metric(metrics_port, "cxr_grpc_requests_total", len(IMAGES), method=CLASSIFY, code="OK")
        for ch in chans:
            ch.close()

    assert [m.name for m in listed.models] == ["multiclass_classifier"]
    assert listed.models[0].device.startswith(device), listed.models[0].device  # "cuda:0" on CUDA
    assert refused.value.code() is grpc.StatusCode.NOT_FOUND
    info = error_info(rpc_status.from_call(refused.value))
    assert info is not None and info.reason == "MODEL_NOT_FOUND"
    per_frontend = [total(text, "cxr_grpc_requests_total", method=CLASSIFY, frontend=str(i)) for i in (0, 1)]
    assert sum(per_frontend) == len(IMAGES) and min(per_frontend) >= 1, per_frontend
    assert total(text, "cxr_frontend_processes") == 2

    async def in_process() -> list[pb.ClassifyImageResponse]:
        settings = make_settings(
            models=models,
            performance=performance,
            server_config__max_batch_size=8,
            server_config__device=device,
        )
        async with running_server(settings, build_binding(settings)) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = pb_grpc.ClassificationServiceStub(ch)
                return [await stub.ClassifyImage(request(i), metadata=auth()) for i in range(len(IMAGES))]

    reference = asyncio.run(in_process())
    for got, want in zip(served, reference, strict=True):
        got_p = [f.probability for f in got.predictions[0].findings]
        want_p = [f.probability for f in want.predictions[0].findings]
        assert got_p == want_p  # bit-equal floats
        assert got.predictions[0].model.version == want.predictions[0].model.version


def test_batches_form_across_frontends(tmp_path: Path) -> None:
    """While one forward runs, 16 requests arrive through both frontends; the next forward takes all 16 at
    once, which no single frontend's requests could fill."""
    metrics_port = free_port()
    with service_process(tmp_path, env=toy_env(metrics_port, 0.6, CXR_SERVER_CONFIG__MAX_BATCH_DELAY_MS="0")) as sp:
        chans, owners, frontends = channels(sp, 16)
        blocker = classify(chans[0], 0)
        time.sleep(0.2)  # the blocker's forward runs; everything below queues behind it
        wave = [classify(ch, i) for i, ch in enumerate(chans[:16])]
        results = [f.result() for f in [blocker, *wave]]
        text = wait_metric(metrics_port, "cxr_grpc_requests_total", 17, method=CLASSIFY, code="OK")
        for ch in chans:
            ch.close()
    assert all(r.predictions[0].findings[0].probability > 0 for r in results)
    wave_owners = owners[:16]
    assert min(wave_owners.count(pid) for pid in frontends) >= 1, wave_owners
    assert total(text, "cxr_batch_size_count", model="toy") == 2
    assert total(text, "cxr_batch_size_sum", model="toy") == 17  # [1, 16]: one forward for both frontends


def test_killed_frontend_costs_only_its_own_requests(tmp_path: Path) -> None:
    """kill -9 one frontend while its requests wait on the model: exactly those fail (UNAVAILABLE), every
    other request is answered, and the frontend is started again and serves."""
    metrics_port = free_port()
    with service_process(tmp_path, env=toy_env(metrics_port, 1.0)) as sp:
        chans, owners, frontends = channels(sp, 8)
        futures = [classify(ch, i) for i, ch in enumerate(chans)]
        time.sleep(0.4)  # every request is in the model's queue or forward
        victim = frontends[0]
        os.kill(victim, signal.SIGKILL)
        outcomes = []
        for f in futures:
            try:
                f.result()
                outcomes.append("OK")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)
        restarted = wait_children(sp.proc.pid, 2, exclude=[victim])
        sp.wait_health(SERVING, timeout=60)
        new_pid = next(pid for pid in restarted if pid not in frontends)
        ch, pid = open_channel_on(sp.target, restarted)
        for _ in range(20):  # reach the new frontend too
            if pid == new_pid:
                break
            ch.close()
            ch, pid = open_channel_on(sp.target, restarted)
        assert pid == new_pid
        after = classify(ch, 1).result()
        text = scrape(metrics_port)
        ch.close()
        for c in chans:
            c.close()
    expected = ["UNAVAILABLE" if owner == victim else "OK" for owner in owners]
    assert outcomes == expected
    assert after.predictions[0].findings[0].probability > 0
    assert total(text, "cxr_frontend_restarts_total") == 1


def test_sigterm_drains_every_frontend(tmp_path: Path) -> None:
    """SIGTERM to the node while requests wait on the model through both frontends: every one is answered,
    then the frontends and the executor exit cleanly."""
    metrics_port = free_port()
    env = toy_env(metrics_port, 0.5, CXR_SERVER_CONFIG__SHUTDOWN_GRACE_S="20")
    with service_process(tmp_path, env=env) as sp:
        chans, _, _ = channels(sp, 12)
        futures = [classify(ch, i) for i, ch in enumerate(chans)]
        time.sleep(0.2)
        sp.signal(signal.SIGTERM)
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        assert sp.wait_exit(40) == 0
        for c in chans:
            c.close()
        assert child_pids(sp.proc.pid) == []
    assert codes == ["OK"] * len(futures)


def test_cancelled_caller_is_dropped_without_touching_others(tmp_path: Path) -> None:
    """Two callers cancel while queued behind a running forward: the executor drops exactly them from the
    batch (cxr_inference_total counts 1 + 6 images run), and the other six are answered."""
    metrics_port = free_port()
    with service_process(tmp_path, env=toy_env(metrics_port, 0.8, CXR_SERVER_CONFIG__MAX_BATCH_DELAY_MS="0")) as sp:
        chans, _, _ = channels(sp, 8)
        blocker = classify(chans[0], 0)
        time.sleep(0.2)
        queued = [classify(ch, i) for i, ch in enumerate(chans[:8])]
        time.sleep(0.2)
        queued[1].cancel()
        queued[4].cancel()
        answered = [f.result() for i, f in enumerate(queued) if i not in (1, 4)]
        blocker.result()
        text = wait_metric(metrics_port, "cxr_inference_total", 7, model="toy")
        for c in chans:
            c.close()
    assert len(answered) == 6
    assert queued[1].cancelled() and queued[4].cancelled()
    assert total(text, "cxr_inference_total", model="toy") == 7


def test_tls_frontends_answer_and_forward_model_admin(tmp_path: Path) -> None:
    """With TLS on, every frontend serves TLS and model admin still reaches the executor (whose private
    unix-socket server runs without TLS); plaintext is refused."""
    pki = make_pki(tmp_path / "pki")
    env = toy_env(
        free_port(),
        0.0,
        CXR_SECURITY__TLS__ENABLED="true",
        CXR_SECURITY__TLS__CERT_FILE=str(pki.server_crt),
        CXR_SECURITY__TLS__KEY_FILE=str(pki.server_key),
    )
    creds = grpc.ssl_channel_credentials(root_certificates=pki.read("ca"))
    with service_process(tmp_path, env=env, wait_serving=False) as sp:
        wait_children(sp.proc.pid, 2)
        deadline = time.monotonic() + 60
        while True:
            with grpc.secure_channel(f"localhost:{sp.port}", creds) as ch:
                stub = pb_grpc.ClassificationServiceStub(ch)
                try:
                    answer = stub.ClassifyImage(request(0), metadata=auth(), timeout=5)
                    listed = stub.ListModels(pb.ListModelsRequest(), metadata=auth(), timeout=5)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        with grpc.insecure_channel(sp.target) as plain, pytest.raises(grpc.RpcError) as refused:
            pb_grpc.ClassificationServiceStub(plain).ClassifyImage(request(0), metadata=auth(), timeout=5)
    assert answer.predictions[0].findings[0].probability > 0
    assert [m.name for m in listed.models] == ["toy"]
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


def test_frontends_exit_when_the_executor_is_killed(tmp_path: Path) -> None:
    """kill -9 of the parent (the executor): no frontend is left listening without it, within 10 s."""
    with service_process(tmp_path, env=toy_env(free_port(), 0.0)) as sp:
        frontends = wait_children(sp.proc.pid, 2)
        sp.proc.kill()
        sp.proc.wait(10)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in frontends) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in frontends if Path(f"/proc/{pid}").exists()]
    assert left == []
