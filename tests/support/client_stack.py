"""The three real services, in-process on 127.0.0.1 ephemeral ports, for client/CLI/MCP tests.

Started once per test process in a background thread with its own event loop (so sync tests,
the CLI's asyncio.run and async tests can all use it), stopped at exit. Small and fast: an
untrained DenseNet-121 at 64 px and a Swin-T, a U-Net at 64 px, and the RAG service in
extractive mode (no LLM) over 20 PubMedQA passages about the chest.

Thresholds are set so that exactly one finding is positive ("Effusion", threshold 2**-20, the
smallest kind of value allowed: 0 is refused) and the binary model is negative (threshold 1): the
analyze workflow then has a known positive finding to search the literature for, whatever the
random weights say.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cxr_client import ClientConfig
from cxr_client.config import SERVICES
from cxr_serving.server import CxrServer, ServiceBinding
from cxr_serving.settings import Settings
from tests.support.paths import PUBMEDQA
from tests.support.servers import TEST_KEY, free_port, make_settings, running_server

POSITIVE = "Effusion"
# The admin key of the stack (LoadModel, UnloadModel, IngestDocuments), distinct from TEST_KEY.
ADMIN_KEY = "test-admin-key-0123456789"
NIH = (
    "Atelectasis Cardiomegaly Effusion Infiltration Mass Nodule Pneumonia Pneumothorax Consolidation Edema "
    "Emphysema Fibrosis Pleural_Thickening Hernia"
).split()
CHEST = re.compile(r"effusion|pneumothorax|chest|pleura|lung|cardiac|heart", re.IGNORECASE)


def _corpus(dest: Path, limit: int = 20) -> Path:
    out = dest / "corpus.jsonl"
    with (PUBMEDQA / "corpus.jsonl").open(encoding="utf-8") as src, out.open("w", encoding="utf-8") as dst:
        n = 0
        for line in src:
            if CHEST.search(json.loads(line)["text"]):
                dst.write(line)
                n += 1
                if n >= limit:
                    break
    return out


def use_stack_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """Point the client's environment (CXR_* endpoints and key) at `stack`, dropping any TLS settings."""
    for k in ("CXR_ENDPOINT", "CXR_TLS", "CXR_TLS_ROOT_CERTS", "CXR_ADMIN_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    for k, v in stack.env().items():
        monkeypatch.setenv(k, v)
    return stack


def stack_question(words: int = 16) -> str:
    """A question certain to be relevant to the stack's small store: the opening words of its first passage."""
    with (PUBMEDQA / "corpus.jsonl").open(encoding="utf-8") as src:
        for line in src:
            text = json.loads(line)["text"]
            if CHEST.search(text):
                return " ".join(text.split()[:words])
    raise AssertionError("no chest-related passage in the corpus")


def stack_settings(workdir: Path, *, with_rag: bool = True, **overrides: Any) -> Settings:
    thresholds = {label: 1.0 for label in NIH} | {POSITIVE: 2**-20}
    return make_settings(
        security__admin_api_keys=[ADMIN_KEY],
        models__binary_classifier={"enabled": True, "allow_untrained": True, "thresholds": 1.0},
        models__multiclass_classifier={
            "enabled": True,
            "allow_untrained": True,
            "input_size": 64,
            "thresholds": thresholds,
        },
        models__segmentation={"enabled": True, "allow_untrained": True, "input_size": 64, "encoder": "resnet18"},
        models__rag={
            "enabled": with_rag,
            "vector_db_path": str(workdir / "chroma"),
            "documents_path": str(_corpus(workdir)) if with_rag else None,
        },
        # the DICOM node serves its gRPC API; its destination is a closed port, a transient failure given up after
        # 0.1 s: an instance sent to it fails twice (0.2 s apart, no attempt spent) and is dead-lettered with one
        # attempt (what `cxr dicom` tests read and retry)
        models__dicom={
            "dimse_port": 0,
            "stow_port": 0,
            "data_path": str(workdir / "dicom"),
            "destinations": {"stow_url": "http://127.0.0.1:9/dicom-web", "timeout_s": 5},
            "max_attempts": 1,
            "max_transient_retry_s": 0.1,
            "retry_backoff_initial_s": 0.2,
            "retry_backoff_max_s": 0.2,
        },
        server_config__max_batch_delay_ms=2,
        **overrides,
    )


def real_builders() -> dict[str, Callable[[Settings], ServiceBinding]]:
    from cxr_classification.service import build_binding as classification
    from cxr_dicom.service import build_binding as dicom
    from cxr_rag.service import build_binding as rag
    from cxr_segmentation.service import build_binding as segmentation

    return {"classification": classification, "segmentation": segmentation, "rag": rag, "dicom": dicom}


class Stack:
    """`builders` (service name -> build_binding) started with one Settings; default: the real three."""

    def __init__(
        self, builders: dict[str, Callable[[Settings], ServiceBinding]] | None = None, **overrides: Any
    ) -> None:
        self.builders = builders
        self.overrides = overrides
        self.tmp = tempfile.TemporaryDirectory(prefix="cxr-client-stack-")
        self.ports: dict[str, int] = {}
        self.servers: dict[str, CxrServer] = {}
        self.closed_port = free_port()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="cxr-stack", daemon=True)

    def _main(self) -> None:
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        try:
            builders = self.builders or real_builders()
            s = stack_settings(Path(self.tmp.name), with_rag="rag" in builders, **self.overrides)
            async with contextlib.AsyncExitStack() as stack:
                for name, build in builders.items():
                    server = await stack.enter_async_context(running_server(s, build(s)))
                    self.ports[name] = server.port
                    self.servers[name] = server
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def start(self, timeout: float = 240) -> Stack:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("services did not become ready")
        if self._error is not None:
            raise RuntimeError(f"stack failed to start: {self._error!r}") from self._error
        return self

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)
        self.tmp.cleanup()

    def endpoints(self) -> dict[str, str]:
        """Every service; one that is not running points at a closed port (UNAVAILABLE)."""
        closed = f"127.0.0.1:{self.closed_port}"
        return {name: f"127.0.0.1:{self.ports[name]}" if name in self.ports else closed for name in SERVICES}

    def config(self, **overrides: object) -> ClientConfig:
        return ClientConfig.model_validate(
            {"endpoints": self.endpoints(), "api_key": TEST_KEY, "admin_api_key": ADMIN_KEY, "timeout_s": 60}
            | overrides
        )

    def env(self) -> dict[str, str]:
        env = {f"CXR_{name.upper()}_ENDPOINT": ep for name, ep in self.endpoints().items()}
        return env | {"CXR_API_KEY": TEST_KEY, "CXR_ADMIN_API_KEY": ADMIN_KEY, "CXR_TIMEOUT_S": "60"}


_STACKS: dict[str, Stack] = {}


def get_stack(kind: str = "real") -> Stack:
    """One running stack per kind per test process: "real" (the three services) or
    "partial" (toy classification + real segmentation, no rag)."""
    if kind not in _STACKS:
        if kind == "real":
            stack = Stack()
        else:
            from cxr_segmentation.service import build_binding as segmentation
            from tests.support.toy_service import build_toy

            stack = Stack({"classification": build_toy, "segmentation": segmentation})
        _STACKS[kind] = stack.start()
        atexit.register(stack.stop)  # a process that never reaches stop_stacks (a script) still stops them
    return _STACKS[kind]


def stop_stacks() -> None:
    """Stop every stack while pytest still captures logging (at exit the streams are closed)."""
    while _STACKS:
        _STACKS.popitem()[1].stop()
