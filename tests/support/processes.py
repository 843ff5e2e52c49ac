"""Starting our server entry points as real child processes in tests."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.paths import REPO


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without CXR_* / DECK_* settings (so a test's config file decides), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CXR_", "DECK_"))}
    return {**env, **extra}


def python_module(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`python -m module args` from the repository root, stdout and stderr merged into one text pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=clean_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def first_model_name(port: int, metadata: tuple[tuple[str, str], ...], timeout: float = 30) -> str:
    """ListModels over gRPC on 127.0.0.1:`port` (a service, or the gateway's proxy): the first model's name."""
    import grpc

    from cxr_protos.classification.v1 import classification_service_pb2 as pb
    from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=timeout)
        reply = pb_grpc.ClassificationServiceStub(ch).ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=20)
    return str(reply.models[0].name)
