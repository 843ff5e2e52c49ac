"""The model executor's end of the frontend links: every frontend's requests go into this process's one
`ModelRepository`, so one batcher per model collects them all and batches form across frontends.

Per link: `expect` announces a request to the batchers (as the single-process servicer does before
decoding), `predict` queues its preprocessed input (tensors as views on the frontend's arena), `cancel`
drops one caller, `done` withdraws what was announced and not sent. Replies carry the output and the
answering version's status. The hub pushes the models' states to every frontend when they change, and
keeps each frontend's last metrics text for the parent's /metrics (frontend_metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import threading
import time
from typing import Any

from cxr_serving.frontend_wire import Arena, ArenaViews, FrameProtocol, StatusMemo, decode, encode
from cxr_serving.instances import _portable
from cxr_serving.lifecycle import ModelRepository
from cxr_serving.urgency import Priority, Urgency

log = logging.getLogger(__name__)
STATE_POLL_S = 0.1  # how soon a model's state change reaches the frontends
FREE_DELAY_S = 0.02  # freed slots ride on the next result; this is how long they wait for one


class _Link:
    """One connected frontend: its messages are handled as they are parsed, in the loop's thread."""

    def __init__(self, hub: FrontendHub) -> None:
        self.hub = hub
        self.protocol = FrameProtocol(self.on_message, self.close)
        self.index = -1
        self.views: ArenaViews | None = None
        self.unpickler: type[pickle.Unpickler] | None = None
        self.expects: dict[int, tuple[Any | None, dict[str, Any] | BaseException]] = {}
        self.unsent: dict[int, int] = {}  # announced models of a request whose predict has not finished
        self.tasks: dict[tuple[int, str], asyncio.Task[None]] = {}
        self.statuses = StatusMemo()
        self.freed: list[int] = []  # guarded by _free_lock: slots are freed from any thread
        self._free_lock = threading.Lock()
        self._free_armed = False
        self.loop = asyncio.get_running_loop()
        self.closed = False

    def send(self, message: Any) -> None:
        writer = self.protocol.writer
        if not self.closed and writer is not None:
            writer.send(encode(message))

    def slot_free(self, offset: int) -> None:
        """Called from any thread when the last view of a slot is gone: the first free of a quiet spell
        arms one timer (one wake-up of the loop, not one per slot); results take the rest along."""
        with self._free_lock:
            self.freed.append(offset)
            if self._free_armed:
                return
            self._free_armed = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: the frontend is gone with it
            self.loop.call_soon_threadsafe(self.loop.call_later, FREE_DELAY_S, self._flush_free)

    def _flush_free(self) -> None:
        with self._free_lock:
            freed, self.freed, self._free_armed = self.freed, [], False
        if freed:
            self.send(("free", freed))

    def _take_freed(self) -> list[int]:
        with self._free_lock:
            freed, self.freed = self.freed, []
        return freed

    def on_message(self, payload: bytes, buffers: list[bytearray]) -> None:
        if self.views is None:  # the first message: hello, naming the frontend's arena
            _, self.index, token = decode(payload, buffers)
            arena = self.hub.arenas.get(token)
            if arena is None:
                log.error("a frontend connected with an unknown arena token; closing its link")
                if self.protocol.writer is not None:
                    self.protocol.writer.close()
                return
            self.views = ArenaViews(arena, self.slot_free)
            self.unpickler = self.views.unpickler()
            self.hub.links.add(self)
            self.send(self.hub.state())
            return
        self.handle(decode(payload, buffers, self.unpickler))

    def handle(self, message: tuple[Any, ...]) -> None:
        op = message[0]
        if op == "predict":
            _, rid, name, item, priority, remaining = message
            key = (rid, name)
            self.tasks[key] = asyncio.ensure_future(self.predict(key, item, Priority(priority), remaining))
        elif op == "expect":
            _, rid, names, versions, priority = message
            manager: Any = self.hub.repo.expect(names, versions, priority=Priority(priority))
            self.unsent[rid] = len(names)
            try:
                self.expects[rid] = (manager, manager.__enter__())
            except Exception as exc:  # NOT_FOUND, shed: the request's predict gets it
                self.expects[rid] = (None, exc)
        elif op == "done":  # the frontend left before predicting every announced model
            self._withdraw(message[1])
        elif op == "cancel":
            task = self.tasks.get((message[1], message[2]))
            if task is not None:
                task.cancel()
        elif op == "metrics":
            self.hub.metrics_text[self.index] = message[1]

    async def predict(self, key: tuple[int, str], item: Any, priority: Priority, remaining: float | None) -> None:
        rid, name = key
        reply: tuple[Any, ...]
        try:
            deadline = None if remaining is None else time.perf_counter() + remaining
            urgency = Urgency(priority, deadline)
            _, dispatches = self.expects.get(rid, (None, {}))
            if isinstance(dispatches, BaseException):
                raise dispatches
            dispatch = dispatches.get(name)
            out = await self.hub.repo.predict(name, item, dispatch, urgency)
            status = dispatch.status if dispatch is not None else self.hub.repo.status(name)
            reply = ("result", rid, name, True, out, status)
        except asyncio.CancelledError:
            reply = ("result", rid, name, False, asyncio.CancelledError(), None)
        except Exception as exc:
            reply = ("result", rid, name, False, _portable(exc), None)
        finally:
            self.tasks.pop(key, None)
            left = self.unsent.get(rid)
            if left is not None:  # every announced model answered: withdraw (a no-op after submit) here
                self.unsent[rid] = left - 1
                if left <= 1:
                    self._withdraw(rid)
        number, full = self.statuses.reference(reply[5])
        freed = self._take_freed()
        try:
            self.send((*reply[:5], number, full, freed))
        except (pickle.PicklingError, TypeError) as exc:
            self.statuses.forget(reply[5])  # it did not go out
            self.send(("result", rid, name, False, _portable(exc), -1, None, freed))

    def _withdraw(self, rid: int) -> None:
        self.unsent.pop(rid, None)
        entered = self.expects.pop(rid, None)
        if entered is not None and entered[0] is not None:
            entered[0].__exit__(None, None, None)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.hub.links.discard(self)
        self.hub.metrics_text.pop(self.index, None)
        for task in list(self.tasks.values()):  # a dead frontend's callers are gone: free their places
            task.cancel()
        for manager, _ in self.expects.values():
            if manager is not None:
                manager.__exit__(None, None, None)
        self.expects.clear()
        if self.protocol.writer is not None:
            self.protocol.writer.close()


class FrontendHub:
    """Accepts frontend links on a unix socket and serves them from `repo`."""

    def __init__(self, repo: ModelRepository) -> None:
        self.repo = repo
        self.arenas: dict[str, Arena] = {}  # by token: the supervisor registers each frontend's arena
        self.links: set[_Link] = set()
        self.metrics_text: dict[int, str] = {}
        self._server: asyncio.AbstractServer | None = None
        self._watch: asyncio.Task[None] | None = None
        self._last_state = b""

    def state(self) -> tuple[Any, ...]:
        return ("state", self.repo.ready, {s.name: s for s in self.repo.statuses()})

    async def start(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Link(self).protocol, path=path)
        self._watch = asyncio.ensure_future(self._push_states())

    async def _push_states(self) -> None:
        while True:
            await asyncio.sleep(STATE_POLL_S)
            state = self.state()
            packed = pickle.dumps(state)
            if packed != self._last_state:
                self._last_state = packed
                for link in list(self.links):
                    link.send(state)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for link in list(self.links):
            link.close()
        if self._server is not None:
            self._server.close()
