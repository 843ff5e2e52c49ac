"""The frontend link's shared-memory hand-over (frontend_wire.py), the default frontend count and the
merged /metrics, in process: what the cross-process tests (tests/reliability/test_frontend_processes.py)
rely on."""

from __future__ import annotations

import asyncio
import gc
import random
import socket
import threading
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, Counter, generate_latest

from cxr_serving.errors import ConfigError, OverloadedError
from cxr_serving.frontend_metrics import FrontendMetrics
from cxr_serving.frontend_wire import (
    MIN_SLOT,
    Arena,
    ArenaPickler,
    ArenaViews,
    FrameParser,
    FrameProtocol,
    FrameWriter,
    SlotAllocator,
    StatusMemo,
    StatusTable,
    decode,
    encode,
)
from cxr_serving.frontends import frontend_count
from cxr_serving.lifecycle import ModelState, ModelStatus
from tests.support.servers import make_settings


def hand_over(item: object, arena: Arena, slots: SlotAllocator, freed: list[int]) -> tuple[object, list[int], int]:
    """`item` as the executor receives it, the slots it took, and the bytes that went through the socket."""
    taken: list[int] = []
    frames = encode(item, ArenaPickler, arena=arena, slots=slots, taken=taken)
    wire = sum(memoryview(f).nbytes for f in frames)
    payload = bytes(frames[1])
    buffers = [bytearray(f) for f in frames[2:]]
    views = ArenaViews(arena, freed.append)
    return decode(payload, buffers, views.unpickler()), taken, wire


def test_a_tensor_crosses_as_a_view_and_its_slot_frees_only_with_its_last_view() -> None:
    arena = Arena.create(1 << 24)
    slots, freed = SlotAllocator(arena.size), []
    tensor = torch.rand(3, 224, 224)
    received, taken, wire = hand_over({"image": tensor, "labels": ("a",)}, arena, slots, freed)
    assert isinstance(received, dict)
    got = received["image"]
    assert torch.equal(got, tensor) and got.dtype == tensor.dtype
    assert wire < 2048  # the pixels did not go through the socket: 602 KB of float32
    assert len(taken) == 1
    arena.array(taken[0], 4, "<f4", (1,))[0] = 42.0  # the executor's tensor is the arena's memory
    assert got.flatten()[0].item() == 42.0
    stacked = torch.stack([got])  # what predict does
    derived = got[0]  # a view the model keeps (e.g. for a shadow run)
    del received, got
    gc.collect()
    assert freed == []  # `derived` still reads the slot
    del derived
    gc.collect()
    assert freed == taken
    assert stacked.shape == (1, 3, 224, 224)


def test_numpy_inputs_cross_through_the_arena_and_small_ones_inline() -> None:
    arena = Arena.create(1 << 24)
    slots, freed = SlotAllocator(arena.size), []
    pixels = (np.arange(512 * 512) % 251).astype(np.uint8).reshape(512, 512)
    small = np.arange(10, dtype=np.float32)
    received, taken, _ = hand_over((pixels, small), arena, slots, freed)
    assert isinstance(received, tuple)
    assert np.array_equal(received[0], pixels) and np.array_equal(received[1], small)
    assert len(taken) == 1  # the 40-byte array travelled in the message


def test_slots_are_reused_by_size_and_a_full_arena_sheds() -> None:
    slots = SlotAllocator(4 * MIN_SLOT)
    a = slots.take(100)
    b = slots.take(MIN_SLOT + 1)  # two minimum slots
    slots.give_back(a)
    assert slots.take(MIN_SLOT) == a
    with pytest.raises(OverloadedError):
        slots.take(2 * MIN_SLOT)
    slots.give_back(b)
    assert slots.take(2 * MIN_SLOT) == b
    assert slots.in_use == 2


def test_frames_cut_anywhere_by_the_socket_come_out_whole_and_in_order() -> None:
    """The link parses what each read returns: a frame may arrive in pieces, several in one piece."""
    messages = [("expect", i, ["m"], {}, 1) for i in range(5)]
    messages += [("result", 7, "m", True, np.arange(2000, dtype=np.float32), 0, None, [65536])]  # out-of-band
    messages += [("free", [])]
    stream = b"".join(b"".join(bytes(f) for f in encode(m)) for m in messages)
    rng = random.Random(23)
    for _ in range(20):
        got: list[Any] = []
        parser = FrameParser(lambda payload, buffers, got=got: got.append(decode(payload, buffers)))
        at = 0
        while at < len(stream):
            step = rng.choice([1, 3, 17, 500, 9000])
            parser.feed(stream[at : at + step])
            at += step
        assert [g[:4] for g in got[:5]] == [m[:4] for m in messages[:5]]
        assert np.array_equal(got[5][4], messages[5][4]) and got[5][7] == [65536]
        assert got[6] == ("free", [])
        assert len(got) == len(messages)


def test_messages_sent_in_one_loop_turn_leave_in_one_write() -> None:
    """A frontend's expects and predicts, or the executor's results of a batch, queued in one turn of the
    event loop go out as one write on the link (one system call, one wake-up of the other side)."""

    async def scenario() -> tuple[int, list[Any]]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        received: list[Any] = []
        arrived = asyncio.Event()

        def on_message(payload: bytes, buffers: list[bytearray]) -> None:
            received.append(decode(payload, buffers))
            if len(received) == 20:
                arrived.set()

        sender = FrameProtocol(lambda p, b: None, lambda: None)
        receiver = FrameProtocol(on_message, lambda: None)
        await loop.connect_accepted_socket(lambda: sender, ours)
        await loop.connect_accepted_socket(lambda: receiver, theirs)
        assert sender.writer is not None
        for i in range(20):
            sender.writer.send(encode(("result", i, "m", True, np.full(8, i, np.float32), 0, None, [])))
        await asyncio.wait_for(arrived.wait(), 5)
        writes = sender.writer.writes
        sender.writer.close()
        assert receiver.writer is not None
        receiver.writer.close()
        await asyncio.sleep(0)
        return writes, received

    writes, received = asyncio.run(scenario())
    assert writes == 1  # at most 1 allowed: without the coalescing it is 20
    assert [m[1] for m in received] == list(range(20))
    assert all(np.array_equal(m[4], np.full(8, i, np.float32)) for i, m in enumerate(received))


def test_a_result_carries_its_status_only_when_the_frontend_has_not_seen_it_as_it_is() -> None:
    """ModelStatus is mutated in place (routing, state): a result carries it the first time and after each
    change, otherwise only its number; the frontend's table always resolves to the executor's status."""
    status = ModelStatus("m", ModelState.READY, "v1", labels=["a", "b"])
    other = ModelStatus("m", ModelState.READY, "v2")
    memo, table = StatusMemo(size=2), StatusTable(size=2)

    def over_the_link(s: ModelStatus | None) -> tuple[Any, Any]:
        number, full = memo.reference(s)
        message = decode(*_frames(encode(("result", 1, "m", True, None, number, full, []))))
        return full, table.resolve(message[5], message[6])

    sent, seen = over_the_link(status)
    assert sent is status and seen == status
    sent, seen = over_the_link(status)
    assert sent is None and seen == status  # the number only
    status.role, status.traffic_percent = "canary", 10.0
    sent, seen = over_the_link(status)
    assert sent is status and seen.role == "canary" and seen.traffic_percent == 10.0
    status.labels.append("c")  # a change inside a field counts too
    sent, seen = over_the_link(status)
    assert sent is status and seen.labels == ["a", "b", "c"]
    assert over_the_link(other)[1] == other
    third = ModelStatus("m", ModelState.READY, "v3")
    assert over_the_link(third)[1] == third  # reuses the number `status` had: `status` goes out again
    sent, seen = over_the_link(status)
    assert sent is status and seen == status
    assert over_the_link(None) == (None, None)
    memo.forget(status)  # a result that named it failed to pickle: the next one carries it
    assert over_the_link(status)[0] is status


def _frames(frames: list[Any]) -> tuple[bytes, list[bytearray]]:
    return bytes(frames[1]), [bytearray(f) for f in frames[2:]]


def test_frontend_count_defaults_to_one_on_cpu_and_half_the_cores_on_gpu() -> None:
    import os

    assert frontend_count(make_settings(server_config__device="cpu")) == 1
    assert frontend_count(make_settings(server_config__device="cuda")) == max(1, len(os.sched_getaffinity(0)) // 2)
    assert frontend_count(make_settings(server_config__device="cuda", server_config__frontend_processes=3)) == 3
    assert frontend_count(make_settings(server_config__frontend_processes=2)) == 2
    # rag and the DICOM node (no model repository) serve from one process, even on a GPU node's config
    assert frontend_count(make_settings(server_config__device="cuda"), serves_models=False) == 1
    with pytest.raises(ConfigError, match="frontend_processes"):
        frontend_count(make_settings(server_config__frontend_processes=2), serves_models=False)


def test_metrics_merge_each_frontend_under_its_label_one_family_per_name() -> None:
    own = CollectorRegistry()
    Counter("cxr_demo_requests", "demo", ["method"], registry=own).labels("Admin").inc()
    theirs = CollectorRegistry()
    Counter("cxr_demo_requests", "demo", ["method"], registry=theirs).labels("Classify").inc(5)
    text = generate_latest(theirs).decode()
    merged = CollectorRegistry()
    merged.register(FrontendMetrics({0: text, 1: text}, base=own))
    out = generate_latest(merged).decode()
    assert out.count("# TYPE cxr_demo_requests_total counter") == 1
    assert 'cxr_demo_requests_total{method="Admin"} 1.0' in out
    assert 'cxr_demo_requests_total{frontend="0",method="Classify"} 5.0' in out
    assert 'cxr_demo_requests_total{frontend="1",method="Classify"} 5.0' in out


def test_port_zero_is_held_for_every_frontend_to_listen_on() -> None:
    import socket

    from cxr_serving.frontends import reserve_port

    holder, port = reserve_port("127.0.0.1", 0)
    assert holder is not None and port > 0
    listeners = []
    try:
        for _ in range(2):  # two frontends bind the held port with SO_REUSEPORT, as grpc.so_reuseport does
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
            listeners.append(s)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        holder.close()
        for s in listeners:
            s.close()
    assert reserve_port("127.0.0.1", 5000) == (None, 5000)


class _RecordingTransport:
    """What FrameWriter hands the transport, call by call."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []

    def is_closing(self) -> bool:
        return False

    def writelines(self, parts: Any) -> None:
        self.calls.append(list(parts))

    def close(self) -> None:
        pass


def test_a_large_output_reaches_the_transport_as_its_own_memory_not_a_copy() -> None:
    """A batch's masks go to the transport's writelines as views on the arrays themselves: nothing here joins
    the frames into one bytes object first. (uvloop's transport writes such a list with one writev and no
    copy; plain asyncio's joins it, which is why the platform runs uvloop.) A recording transport stands in."""

    async def scenario() -> tuple[list[list[Any]], list[np.ndarray]]:
        transport = _RecordingTransport()
        writer = FrameWriter(transport)  # type: ignore[arg-type]
        masks = [np.random.default_rng(i).integers(0, 255, (512, 512), dtype=np.uint8) for i in range(3)]
        for i, mask in enumerate(masks):
            writer.send(encode(("result", i, "seg", True, mask, 0, None, [])))
        await asyncio.sleep(0)  # the flush runs at the end of this turn
        return transport.calls, masks

    calls, masks = asyncio.run(scenario())
    assert len(calls) == 1, len(calls)
    parts = calls[0]
    for mask in masks:
        sharing = [p for p in parts if np.shares_memory(np.frombuffer(p, np.uint8), mask)]
        assert len(sharing) == 1 and memoryview(sharing[0]).nbytes == mask.nbytes


def test_slots_freed_in_a_quiet_spell_wake_the_executor_loop_once_and_leave_in_one_message() -> None:
    """The last view of a slot may die on any thread (a batch thread, the collector); the first free of a quiet
    spell arms one timer through the loop (one cross-thread wake-up), the rest ride along with it, and a
    result sent meanwhile takes them instead of a separate message."""
    from cxr_serving import frontend_hub

    class CountingLoop:
        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            self.loop, self.wakeups = loop, 0

        def call_soon_threadsafe(self, *args: Any) -> Any:
            self.wakeups += 1
            return self.loop.call_soon_threadsafe(*args)

        def call_later(self, *args: Any) -> Any:
            return self.loop.call_later(*args)

    async def scenario() -> tuple[int, list[Any], list[int]]:
        link = frontend_hub._Link(hub=None)  # type: ignore[arg-type]
        counting = CountingLoop(asyncio.get_running_loop())
        link.loop = counting  # type: ignore[assignment]
        sent: list[Any] = []
        link.send = sent.append  # type: ignore[method-assign]
        threads = [threading.Thread(target=link.slot_free, args=(64 * i,)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        await asyncio.sleep(frontend_hub.FREE_DELAY_S * 5)
        first_spell = counting.wakeups
        link.slot_free(1 << 20)  # a second spell: one more wake-up, but a result takes its slot first
        taken = link._take_freed()  # what `predict` does as it sends a result
        await asyncio.sleep(frontend_hub.FREE_DELAY_S * 5)
        assert counting.wakeups == first_spell + 1
        return first_spell, sent, taken

    wakeups, sent, taken = asyncio.run(scenario())
    assert wakeups == 1  # at most 1 allowed: one per slot (50) without the arming
    assert len(sent) == 1 and sent[0][0] == "free" and sorted(sent[0][1]) == [64 * i for i in range(50)]
    assert taken == [1 << 20]  # the result carried it: the timer then sent no empty "free" message
