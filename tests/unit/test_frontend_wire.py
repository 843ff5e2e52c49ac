"""The frontend link's shared-memory hand-over (frontend_wire.py), the default frontend count and the
merged /metrics, in process: what the cross-process tests (tests/reliability/test_frontend_processes.py)
rely on."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, Counter, generate_latest

from cxr_serving.errors import ConfigError, OverloadedError
from cxr_serving.frontend_metrics import FrontendMetrics
from cxr_serving.frontend_wire import MIN_SLOT, Arena, ArenaPickler, ArenaViews, SlotAllocator, decode, encode
from cxr_serving.frontends import frontend_count
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
