"""The link between a frontend process and the model executor: framed pickle messages over a unix
socket, whose array and tensor payloads travel through a shared-memory arena instead of the socket.

A frontend copies each preprocessed tensor once into its arena (a memfd both processes map) and sends
its offset, shape and dtype; the executor builds a tensor on the same memory, and tells the frontend
the slot is free again only when the last tensor over it is garbage (the batch ran, a shadow run
finished), so a slot is never rewritten under a forward. Layout and lifetimes: docs/serving-runtime.md.
"""

from __future__ import annotations

import asyncio
import copy
import io
import logging
import mmap
import os
import pickle
import struct
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from cxr_serving.errors import OverloadedError
from cxr_serving.instances import _Pickler as _ArrayPickler

ARENA_BYTES = 1 << 30  # virtual size of one frontend's arena; only the pages in use take memory
MIN_SLOT = 1 << 16  # smallest slot: slots are powers of two from here, so freed ones are reused by size
SMALL_ARRAY = 4096  # arrays under this many bytes travel in the message itself
_COUNT = struct.Struct("<I")
log = logging.getLogger(__name__)


def _slot_size(nbytes: int) -> int:
    return max(MIN_SLOT, 1 << (max(nbytes, 1) - 1).bit_length())


class Arena:
    """One memfd mapping: created by the supervisor, inherited by its frontend, mapped by both."""

    def __init__(self, fd: int, size: int = ARENA_BYTES) -> None:
        self.fd = fd
        self.size = size
        self.map = mmap.mmap(fd, size)

    @classmethod
    def create(cls, size: int = ARENA_BYTES) -> Arena:
        fd = os.memfd_create("cxr-frontend-arena", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, size)

    def array(self, offset: int, nbytes: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        """A numpy view of `nbytes` at `offset` (no copy)."""
        return np.frombuffer(self.map, np.uint8, nbytes, offset).view(np.dtype(dtype)).reshape(shape)

    def close_fd(self) -> None:
        """Drop the descriptor; the mapping (and every view on it) stays valid."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SlotAllocator:
    """A frontend's free slots by size: a new slot is cut from the end of the arena, a freed one reused.
    Single-threaded (the frontend's event loop)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._end = 0
        self._free: dict[int, list[int]] = {}
        self._sizes: dict[int, int] = {}

    @property
    def in_use(self) -> int:
        return len(self._sizes)

    def take(self, nbytes: int) -> int:
        size = _slot_size(nbytes)
        free = self._free.get(size)
        if free:
            offset = free.pop()
        else:
            if self._end + size > self._size:
                raise OverloadedError(
                    "this frontend's shared-memory arena is full of requests still in the model's queue; retry later"
                )
            offset, self._end = self._end, self._end + size
        self._sizes[offset] = size
        return offset

    def give_back(self, offset: int) -> None:
        size = self._sizes.pop(offset, None)
        if size is not None:
            self._free.setdefault(size, []).append(offset)


# --- framing -------------------------------------------------------------------------------------


def encode(obj: Any, pickler: type[pickle.Pickler] = _ArrayPickler, **kw: Any) -> list[Any]:
    """`obj` as frames: a header of sizes, the pickle, then each out-of-band buffer (arrays, tensors)."""
    buffers: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    pickler(out, protocol=5, buffer_callback=buffers.append, **kw).dump(obj)
    parts: list[Any] = [out.getbuffer(), *(b.raw() for b in buffers)]
    header = struct.pack(f"<I{len(parts)}Q", len(parts), *(memoryview(p).nbytes for p in parts))
    return [header, *parts]


class FrameParser:
    """Cuts a byte stream into messages: every complete frame in what arrived is handed to `on_message`
    (payload, out-of-band buffers) at once, with no await per frame."""

    def __init__(self, on_message: Callable[[bytes, list[bytearray]], None]) -> None:
        self._on_message = on_message
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos, end = 0, len(buf)
        while end - pos >= 4:
            (count,) = _COUNT.unpack_from(buf, pos)
            head = 4 + 8 * count
            if end - pos < head:
                break
            sizes = struct.unpack_from(f"<{count}Q", buf, pos + 4)
            if end - pos < head + sum(sizes):
                break
            at = pos + head
            payload = bytes(buf[at : at + sizes[0]])
            at += sizes[0]
            buffers = []
            for n in sizes[1:]:
                buffers.append(buf[at : at + n])  # a copy: the array built on it outlives this buffer
                at += n
            pos = at
            self._on_message(payload, buffers)
        if pos:
            del buf[:pos]


class FrameWriter:
    """Sends messages on a transport, every message queued in one turn of the event loop in one write:
    a request's `expect` and `predict`, or a batch's results, cost one system call (and one wake-up
    of the other side) instead of one each."""

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._transport: Any = transport
        self._loop = asyncio.get_running_loop()
        self._parts: list[Any] = []
        self.writes = 0  # system-call-sized writes so far (the test of the coalescing reads it)

    def send(self, frames: list[Any]) -> None:
        if not self._parts:
            self._loop.call_soon(self.flush)
        self._parts.extend(frames)

    def flush(self) -> None:
        parts, self._parts = self._parts, []
        if parts and not self._transport.is_closing():
            self.writes += 1
            self._transport.writelines(parts)  # uvloop: one writev, no copy of large outputs (masks)

    def is_closing(self) -> bool:
        return bool(self._transport.is_closing())

    def close(self) -> None:
        self.flush()
        self._transport.close()


class FrameProtocol(asyncio.Protocol):
    """One end of a link: frames in go to `on_message`, a lost connection to `on_lost` (once)."""

    def __init__(self, on_message: Callable[[bytes, list[bytearray]], None], on_lost: Callable[[], None]) -> None:
        self.parser = FrameParser(on_message)
        self._on_lost = on_lost
        self.writer: FrameWriter | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.writer = FrameWriter(transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed(data)
        except Exception:  # a message this end cannot handle: the link is broken, close it
            log.exception("frontend link: closing after a message failed")
            if self.writer is not None:
                self.writer.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()


def decode(payload: bytes, buffers: list[bytearray], unpickler: type[pickle.Unpickler] | None = None) -> Any:
    if unpickler is None:
        return pickle.loads(payload, buffers=buffers)  # noqa: S301 - our own processes, over a private socket
    return unpickler(io.BytesIO(payload), buffers=buffers).load()


# --- frontend side: arrays and tensors into the arena ------------------------------------------------


class ArenaPickler(_ArrayPickler):
    """Pickles a frontend's message: numpy arrays and CPU tensors go into arena slots (`taken` lists the
    offsets), everything else in the pickle."""

    def __init__(self, *args: Any, arena: Arena, slots: SlotAllocator, taken: list[int], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._arena, self._slots, self._taken = arena, slots, taken

    def persistent_id(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if isinstance(obj, np.ndarray):
            kind, array = "numpy", obj
        elif torch is not None and isinstance(obj, torch.Tensor):
            if obj.device.type != "cpu" or obj.layout != torch.strided or obj.dtype == torch.bfloat16:
                return None
            kind, array = "torch", obj.detach().numpy()  # a view: the copy is the one into the slot
        else:
            return None
        if array.nbytes < SMALL_ARRAY or array.dtype.hasobject:
            return None
        offset = self._slots.take(array.nbytes)
        self._taken.append(offset)
        np.copyto(self._arena.array(offset, array.nbytes, array.dtype.str, array.shape), array)
        return (kind, offset, array.nbytes, array.dtype.str, array.shape)


# --- executor side: views on the arena, freed when the last one is garbage ------------------------------


class ArenaViews:
    """The executor's side of one frontend's arena: builds views for a message's slots, and reports each
    slot through `on_free` (from whichever thread drops the last view) once nothing refers to it."""

    def __init__(self, arena: Arena, on_free: Callable[[int], None]) -> None:
        self._arena = arena
        self._on_free = on_free
        self._lock = threading.Lock()

    def view(self, pid: tuple[str, int, int, str, tuple[int, ...]]) -> Any:
        kind, offset, nbytes, dtype, shape = pid
        base = np.frombuffer(self._arena.map, np.uint8, nbytes, offset)
        weakref.finalize(base, self._on_free, offset)  # every view below keeps `base` alive
        array = base.view(np.dtype(dtype)).reshape(shape)
        if kind == "torch":
            import torch

            return torch.from_numpy(array)
        return array

    def unpickler(self) -> type[pickle.Unpickler]:
        views = self

        class _Unpickler(pickle.Unpickler):
            def persistent_load(self, pid: Any) -> Any:
                return views.view(pid)

        return _Unpickler


# --- the answering version's status, sent once per change ------------------------------------------------

STATUS_TABLE = 64  # statuses a link remembers (one per loaded version): more than a node serves at once


class StatusMemo:
    """The executor's side: a result names its version's status by a small number, and carries the status
    itself only the first time and after it changed (ModelStatus is mutated in place on routing and state
    changes), so most results pickle no status. Numbers are reused round-robin; a reused number always
    comes with its new status, and the link keeps messages in order, so both tables agree."""

    def __init__(self, size: int = STATUS_TABLE) -> None:
        self._size = size
        self._by_id: dict[int, tuple[Any, int, dict[str, Any]]] = {}  # id(status): status, number, its fields
        self._numbers: list[int | None] = [None] * size  # number: id of the status it names
        self._cursor = 0

    def reference(self, status: Any) -> tuple[int, Any]:
        """(number, the status or None when the other side has it as it is now); (-1, None) for no status."""
        if status is None:
            return -1, None
        entry = self._by_id.get(id(status))
        if entry is not None:
            if _same(vars(status), entry[2]):
                return entry[1], None
            number = entry[1]
        else:
            number, self._cursor = self._cursor, (self._cursor + 1) % self._size
            old = self._numbers[number]
            if old is not None:
                self._by_id.pop(old, None)
            self._numbers[number] = id(status)
        self._by_id[id(status)] = (status, number, copy.deepcopy(vars(status)))  # holds it: its id stays its own
        return number, status

    def forget(self, status: Any) -> None:
        """`status` did not reach the other side: the next result that names it carries it again."""
        entry = self._by_id.pop(id(status), None)
        if entry is not None:
            self._numbers[entry[1]] = None


def _same(now: dict[str, Any], before: dict[str, Any]) -> bool:
    try:
        return bool(now == before)
    except ValueError:  # a field whose == is not a truth value (an array): count it as changed
        return False


class StatusTable:
    """The frontend's side of a `StatusMemo`."""

    def __init__(self, size: int = STATUS_TABLE) -> None:
        self._statuses: list[Any] = [None] * size

    def resolve(self, number: int, status: Any) -> Any:
        if number < 0:
            return None
        if status is not None:
            self._statuses[number] = status
        return self._statuses[number]
