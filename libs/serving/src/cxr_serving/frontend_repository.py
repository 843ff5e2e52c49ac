"""A frontend process's stand-in for the `ModelRepository`: the servicer's request path runs unchanged
(select, expect, decode and preprocess, predict, postprocess), but `expect` and `predict` go to the
model executor over the frontend link (frontend_hub.py), and the models' states are the executor's.

The models here are never loaded: they give the servicer its configuration (labels, preprocessing,
postprocessing). Model admin never runs here: the frontend forwards those RPCs to the executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cxr_serving.errors import ModelNotReadyError
from cxr_serving.frontend_wire import (
    Arena,
    ArenaPickler,
    FrameProtocol,
    SlotAllocator,
    StatusTable,
    decode,
    encode,
)
from cxr_serving.instances import ModelFactory
from cxr_serving.lifecycle import BatchingConfig, Dispatch, ModelRepository, ModelStatus, ServedModel
from cxr_serving.metrics import MODEL_LOADED
from cxr_serving.urgency import ROUTINE, Priority, Urgency

log = logging.getLogger(__name__)
METRICS_PUSH_S = 1.0  # how often a frontend's metrics reach the executor's /metrics


@dataclass
class RemoteDispatch(Dispatch):
    """A Dispatch whose version the executor chose; `request` names its announcement there."""

    request: int = 0


class RemoteRepository(ModelRepository):
    """The repository as one frontend sees it."""

    def __init__(self, batching: BatchingConfig, hub_path: str, token: str, index: int, arena: Arena) -> None:
        super().__init__(batching)
        self._hub_path = hub_path
        self._token = token
        self._index = index
        self._arena = arena
        self._slots = SlotAllocator(arena.size)
        self._ids = itertools.count(1)
        self._waiting: dict[tuple[int, str], asyncio.Future[Any]] = {}
        self._sent: dict[int, set[str]] = {}  # per announced request: the models its predict was sent for
        self._protocol: FrameProtocol | None = None
        self._statuses = StatusTable()
        self._metrics_task: asyncio.Task[None] | None = None
        self._remote_ready = False
        self._closing = False
        self._lost_once = False
        self._first_state: asyncio.Event | None = None
        self.on_link_lost: Any = None  # called once when the executor goes away

    def add(
        self,
        model: ServedModel,
        *,
        required: bool = True,
        factory: ModelFactory | None = None,
        batching: BatchingConfig | None = None,
    ) -> None:
        super().add(model, required=required, factory=factory, batching=batching)
        MODEL_LOADED.remove(model.name)  # the executor reports what is loaded, not the frontends

    @property
    def slots_in_use(self) -> int:
        return self._slots.in_use

    # -- the link ---------------------------------------------------------------------------------------
    async def load_all(self) -> None:
        """Connect to the executor and wait until it reports every required model ready (or goes away):
        the models load there, and health follows its reports from then on."""
        self._first_state = asyncio.Event()
        protocol = FrameProtocol(self._on_message, self._lost)
        try:
            await asyncio.get_running_loop().create_unix_connection(lambda: protocol, self._hub_path)
        except OSError:
            self._lost()  # no executor to serve for: the frontend stops
            raise
        self._protocol = protocol
        self._send(("hello", self._index, self._token))
        self._metrics_task = asyncio.ensure_future(self._push_metrics())
        await self._first_state.wait()

    def _send(self, message: Any, taken: list[int] | None = None) -> None:
        writer = None if self._protocol is None else self._protocol.writer
        if writer is None or writer.is_closing():
            raise ModelNotReadyError("this frontend lost its link to the model executor")
        if taken is None:
            writer.send(encode(message))
        else:
            writer.send(encode(message, ArenaPickler, arena=self._arena, slots=self._slots, taken=taken))

    def _on_message(self, payload: bytes, buffers: list[bytearray]) -> None:
        self._handle(decode(payload, buffers))

    def _handle(self, message: tuple[Any, ...]) -> None:
        op = message[0]
        if op == "result":
            _, rid, name, ok, value, number, full, freed = message
            status = self._statuses.resolve(number, full)
            for offset in freed:
                self._slots.give_back(offset)
            key = (rid, name)
            future = self._waiting.pop(key, None)
            if future is not None:
                if not future.done():
                    future.set_result((ok, value, status))
        elif op == "free":
            for offset in message[1]:
                self._slots.give_back(offset)
        elif op == "state":
            _, ready, statuses = message
            before = self.ready
            self._remote_ready = ready
            self._status.update(statuses)
            if self._first_state is not None and ready:
                self._first_state.set()
            if self.ready != before:
                self._notify()

    def _lost(self) -> None:
        if self._lost_once:
            return
        self._lost_once = True
        was_ready = self.ready
        self._remote_ready = False
        if self._protocol is not None and self._protocol.writer is not None:
            self._protocol.writer.close()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ModelNotReadyError("the model executor went away"))
        self._waiting.clear()
        if was_ready:
            self._notify()
        if self._first_state is not None:
            self._first_state.set()
        if self.on_link_lost is not None and not self._closing:
            self.on_link_lost()

    async def _push_metrics(self) -> None:
        from prometheus_client import REGISTRY, generate_latest

        while True:
            with contextlib.suppress(ModelNotReadyError):
                self._send(("metrics", generate_latest(REGISTRY).decode()))
            await asyncio.sleep(METRICS_PUSH_S)

    @property
    def ready(self) -> bool:
        return self._remote_ready and super().ready

    # -- the request path -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def expect(
        self,
        names: Sequence[str],
        versions: Mapping[str, str] | None = None,
        *,
        priority: Priority = Priority.ROUTINE,
    ) -> Iterator[dict[str, Dispatch]]:
        for n in names:
            self.model(n)
        rid = next(self._ids)
        self._send(("expect", rid, list(names), dict(versions or {}), priority.value))
        self._sent[rid] = set()
        try:
            yield {n: RemoteDispatch((versions or {}).get(n, ""), "remote", request=rid) for n in names}
        finally:
            if self._sent.pop(rid) != set(names):  # the executor withdraws on its own once every one is sent
                with contextlib.suppress(ModelNotReadyError):
                    self._send(("done", rid))

    async def predict(self, name: str, item: Any, dispatch: Dispatch | None = None, urgency: Urgency = ROUTINE) -> Any:
        self.model(name)
        rid = dispatch.request if isinstance(dispatch, RemoteDispatch) else -next(self._ids)
        key = (rid, name)
        remaining = None if urgency.deadline is None else urgency.deadline - time.perf_counter()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        taken: list[int] = []
        try:
            self._send(("predict", rid, name, item, urgency.priority.value, remaining), taken)
        except BaseException:
            for offset in taken:
                self._slots.give_back(offset)
            raise
        self._waiting[key] = future
        if rid in self._sent:
            self._sent[rid].add(name)
        try:
            ok, value, status = await future
        except asyncio.CancelledError:
            if self._waiting.pop(key, None) is not None:  # the executor drops it from its queue
                with contextlib.suppress(ModelNotReadyError):
                    self._send(("cancel", rid, name))
            raise
        if not ok:
            raise value
        if dispatch is not None:
            dispatch.status = status
            dispatch.version = status.version
        return value

    async def close(self) -> None:
        self._closing = True
        if self._metrics_task is not None:
            self._metrics_task.cancel()
        if self._protocol is not None and self._protocol.writer is not None:
            self._protocol.writer.close()

    # -- model admin runs in the executor only --------------------------------------------------------
    def version_statuses(self) -> list[ModelStatus]:
        return self.statuses()
