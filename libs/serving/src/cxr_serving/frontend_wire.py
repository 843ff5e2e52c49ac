"""The link between a frontend process and the model executor: framed pickle messages over a unix
socket, whose array and tensor payloads travel through a shared-memory arena instead of the socket.

A frontend copies each preprocessed tensor once into its arena (a memfd both processes map) and sends
its offset, shape and dtype; the executor builds a tensor on the same memory, and tells the frontend
the slot is free again only when the last tensor over it is garbage (the batch ran, a shadow run
finished), so a slot is never rewritten under a forward. Layout and lifetimes: docs/serving-runtime.md.
"""

from __future__ import annotations

import asyncio
import io
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


async def read_frames(reader: asyncio.StreamReader) -> tuple[bytes, list[bytearray]]:
    (count,) = struct.unpack("<I", await reader.readexactly(4))
    sizes = struct.unpack(f"<{count}Q", await reader.readexactly(8 * count))
    payload = await reader.readexactly(sizes[0])
    buffers = [bytearray(await reader.readexactly(n)) if n else bytearray() for n in sizes[1:]]
    return payload, buffers


def decode(payload: bytes, buffers: list[bytearray], unpickler: type[pickle.Unpickler] = pickle.Unpickler) -> Any:
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
