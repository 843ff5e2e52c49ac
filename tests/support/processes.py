"""Starting our server entry points as real child processes in tests."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.support.paths import REPO


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without CXR_* / DECK_* settings (so a test's config file decides), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CXR_", "DECK_"))}
    return {**env, **extra}


def python_module(
    module: str, *args: str, env: dict[str, str] | None = None, preexec_fn: Callable[[], Any] | None = None
) -> subprocess.Popen[str]:
    """`python -m module args` from the repository root, stdout and stderr merged into one text pipe;
    `preexec_fn` runs in the child before it starts Python."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=clean_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=preexec_fn,
    )


def first_log_match(proc: subprocess.Popen[str], pattern: str, seconds: float = 60) -> tuple[re.Match[str] | None, str]:
    """The first line of `proc`'s output matching `pattern` (None if it exits or `seconds` pass first), and the
    output read so far (for the assertion message)."""
    seen: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if m := re.search(pattern, line):
            return m, "".join(seen)
    return None, "".join(seen)


def toy_service_config(path: Path, port: int, server_config: dict[str, Any], key: str) -> Path:
    """A config for `tests.support.toy_service` on 127.0.0.1:`port`, JSON logs at INFO, `key` its API key."""
    path.write_text(
        json.dumps(
            {
                "server_config": {"log_level": "INFO", **server_config},
                "security": {"api_keys": [key]},
                "monitoring": {"log_json": True, "enable_metrics": False},
                "services": {"classification": {"host": "127.0.0.1", "port": port, "metrics_port": 0}},
            }
        )
    )
    return path


def refused_server_config(path: Path, server_config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """`tests.support.toy_service` started with only this `server_config`: expected to stop as a config error."""
    path.write_text(json.dumps({"server_config": server_config}))
    return subprocess.run([sys.executable, "-m", "tests.support.toy_service", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def first_model_name(port: int, metadata: tuple[tuple[str, str], ...], timeout: float = 30) -> str:
    """ListModels over gRPC on 127.0.0.1:`port` (a service, or the gateway's proxy): the first model's name."""
    import grpc

    from cxr_protos.classification.v1 import classification_service_pb2 as pb
    from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=timeout)
        reply = pb_grpc.ClassificationServiceStub(ch).ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=20)
    return str(reply.models[0].name)


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """`proc`, killed and reaped on the way out if it is still running (a failed assertion, a hang)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stopped_by_sigterm(proc: subprocess.Popen[str], seconds: float = 30) -> int:
    """SIGTERM `proc` and wait for it: its exit code (0 for a clean drain and stop)."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=seconds)


def classify_once(port: int, png: bytes, key: str) -> None:
    """One ClassifyImage call to a service process on 127.0.0.1:`port` with API key `key` (raises unless OK)."""
    import grpc

    from cxr_protos.classification.v1 import classification_service_pb2 as pb
    from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
    from cxr_protos.common.v1 import common_pb2

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        pb_grpc.ClassificationServiceStub(ch).ClassifyImage(
            pb.ClassifyImageRequest(image=common_pb2.Image(data=png)), metadata=(("x-api-key", key),), timeout=60
        )
