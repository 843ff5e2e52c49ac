"""`server_config.frontend_processes: 2`: two frontend processes on one port feed one model executor.

Real service processes on 127.0.0.1, real NIH PNGs. Each channel here is its own TCP connection, and the
test reads from /proc which frontend accepted it, so it knows which requests each frontend carried."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from tests.support.frontend_classify import (
    CLASSIFY,
    SERVING,
    channels,
    check_two_frontends_bit_equal_to_one_process,
    classify,
    request,
    toy_env,
)
from tests.support.frontends import child_pids, open_channel_on, scrape, total, wait_children, wait_metric
from tests.support.pki import make_pki
from tests.support.servers import auth, free_port
from tests.support.service_process import service_process
from tests.support.toy_service import ToyGate


def test_two_frontends_answer_bit_equal_to_one_process(tmp_path: Path) -> None:
    """tests/support/frontend_classify.py: on the CPU (tests/gpu/test_frontends_gpu.py: the same on CUDA)."""
    check_two_frontends_bit_equal_to_one_process(tmp_path, "cpu")


def test_batches_form_across_frontends(tmp_path: Path) -> None:
    """While one forward runs, 16 requests arrive through both frontends; the next forward takes all 16 at
    once, which no single frontend's requests could fill."""
    metrics_port = free_port()
    gate = ToyGate(tmp_path)
    env = toy_env(metrics_port, 0, CXR_SERVER_CONFIG__MAX_BATCH_DELAY_MS="0", TOY_GATE_DIR=str(gate.dir))
    with service_process(tmp_path, env=env) as sp:
        chans, owners, frontends = channels(sp, 16)
        blocker = classify(chans[0], 0)
        assert gate.wait_entered() == 1  # the blocker's forward runs, held; everything below queues behind it
        wave = [classify(ch, i) for i, ch in enumerate(chans[:16])]
        queued = wait_metric(metrics_port, "cxr_queue_depth", 16, timeout=30, model="toy")
        gate.release()
        results = [f.result() for f in [blocker, *wave]]
        text = wait_metric(metrics_port, "cxr_grpc_requests_total", 17, method=CLASSIFY, code="OK")
        for ch in chans:
            ch.close()
    assert total(queued, "cxr_queue_depth", model="toy") == 16
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
    gate = ToyGate(tmp_path)
    env = toy_env(metrics_port, 0.5, CXR_SERVER_CONFIG__SHUTDOWN_GRACE_S="20", TOY_GATE_DIR=str(gate.dir))
    with service_process(tmp_path, env=env) as sp:
        chans, _, _ = channels(sp, 12)
        futures = [classify(ch, i) for i, ch in enumerate(chans)]
        running = gate.wait_entered()
        depth = wait_metric(metrics_port, "cxr_queue_depth", 12 - running, timeout=30, model="toy")
        assert total(depth, "cxr_queue_depth", model="toy") == 12 - running  # every request is in the executor
        sp.signal(signal.SIGTERM)
        time.sleep(0.5)  # the drain's 0.5 s to begin while the forward is held
        gate.release()
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
    gate = ToyGate(tmp_path)
    env = toy_env(metrics_port, 0, CXR_SERVER_CONFIG__MAX_BATCH_DELAY_MS="0", TOY_GATE_DIR=str(gate.dir))
    with service_process(tmp_path, env=env) as sp:
        chans, _, _ = channels(sp, 8)
        blocker = classify(chans[0], 0)
        assert gate.wait_entered() == 1
        queued = [classify(ch, i) for i, ch in enumerate(chans[:8])]
        depth = wait_metric(metrics_port, "cxr_queue_depth", 8, timeout=30, model="toy")
        assert total(depth, "cxr_queue_depth", model="toy") == 8
        queued[1].cancel()
        queued[4].cancel()
        # a frontend's metrics reach the executor on the connection its cancels took, after them: once both
        # CANCELLED are counted there, the executor has had both cancels
        cancelled = wait_metric(metrics_port, "cxr_grpc_requests_total", 2, 30, method=CLASSIFY, code="CANCELLED")
        assert total(cancelled, "cxr_grpc_requests_total", method=CLASSIFY, code="CANCELLED") == 2
        gate.release()
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
