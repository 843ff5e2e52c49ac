"""`python -m cxr_rag` as a process, as `make run` starts it: first start ingests
documents_path (with a progress bar) into an empty embedded store, then serves; SIGTERM drains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cxr_protos.rag.v1 import rag_service_pb2 as pb
from cxr_protos.rag.v1 import rag_service_pb2_grpc as pb_grpc
from tests.support.paths import REPO
from tests.support.rag import subset_corpus
from tests.support.servers import TEST_KEY, auth, free_port


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_first_start_ingests_then_serves_extractive(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(subset_corpus().read_text().splitlines()[:12]) + "\n")
    port = free_port()
    cfg = {
        "models": {
            "rag": {
                "vector_db_path": str(tmp_path / "db"),
                "documents_path": str(corpus),
                "llm": {"mode": "extractive"},
            }
        },
        "services": {"rag": {"host": "127.0.0.1", "port": port, "metrics_port": 0}},
        "monitoring": {"log_json": False},
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "CXR_API_KEY": TEST_KEY, "HF_HUB_OFFLINE": "1"}
    env.pop("CXR_CONFIG_PATH", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxr_rag", "--config", str(tmp_path / "cfg.json")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            deadline = time.time() + 480
            while time.time() < deadline:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                try:
                    st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    if st == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
            else:
                pytest.fail("rag service did not become SERVING")
            r = pb_grpc.RagServiceStub(ch).AnswerQuestion(
                pb.AnswerQuestionRequest(
                    question="Does the helicopter environment impair intubation by flight nurses?"
                ),
                metadata=auth(),
                timeout=60,
            )
            assert r.extractive and r.citations and r.citations[0].source == "PMID:10135926"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert "ingest: 100%" in out and "12/12" in out  # the progress bar
        assert "ingested 12 documents" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
