"""CPU placement of a benchmark's process trees (Linux `sched_setaffinity`): `split` gives the model services
one CPU set and the caller (the DICOM node, Orthanc, the bench's own client) another, as the chart's separate
node pools do, so the node's CPU does not come out of the models' cores."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._common import process_tree

MODES = ("shared", "split")
SPLIT_MIN_CPUS = 2
PIN_PASSES = 5  # a process that forks while its tree is pinned gets another pass; at most this many


class PlacementError(ValueError):
    """A placement that cannot be applied on the CPUs this process may use."""


@dataclass(frozen=True)
class Placement:
    mode: str
    allowed: frozenset[int]
    model_cpus: frozenset[int]
    node_cpus: frozenset[int]

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "allowed_cpus": sorted(self.allowed),
            "model_cpus": sorted(self.model_cpus),
            "node_cpus": sorted(self.node_cpus),
        }


def parse_cpus(text: str) -> frozenset[int]:
    """A CPU list as taskset and cpusets write it: "0", "0,2", "0-3,6"."""
    cpus: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise PlacementError(f"not a CPU list: {text!r} (e.g. 0,1 or 0-3)") from None
    if not cpus:
        raise PlacementError(f"empty CPU list: {text!r}")
    return frozenset(cpus)


def plan(
    mode: str,
    allowed: frozenset[int] | None = None,
    model_cpus: frozenset[int] | None = None,
    node_cpus: frozenset[int] | None = None,
) -> Placement:
    """`shared`: everything on every allowed CPU (nothing is pinned). `split`: the models on `model_cpus`, the
    rest on `node_cpus`; by default the first half of the allowed CPUs (the larger half) for the models and the
    others for the rest; a list given alone gets the remaining CPUs as the other."""
    allowed = frozenset(os.sched_getaffinity(0)) if allowed is None else allowed
    if mode not in MODES:
        raise PlacementError(f"unknown placement {mode!r}: one of {', '.join(MODES)}")
    if mode == "shared":
        if model_cpus or node_cpus:
            raise PlacementError("--model-cpus/--node-cpus need --placement split")
        return Placement("shared", allowed, allowed, allowed)
    if len(allowed) < SPLIT_MIN_CPUS:
        raise PlacementError(
            f"--placement split needs at least {SPLIT_MIN_CPUS} CPUs (one set for the models, one for the node, "
            f"Orthanc and the bench); this process may run on CPU(s) {sorted(allowed)} only"
        )
    ordered = sorted(allowed)
    if model_cpus is None:
        model_cpus = allowed - node_cpus if node_cpus else frozenset(ordered[: len(ordered) - len(ordered) // 2])
    node_cpus = allowed - model_cpus if node_cpus is None else node_cpus
    for name, cpus in (("--model-cpus", model_cpus), ("--node-cpus", node_cpus)):
        if not cpus:
            raise PlacementError(f"{name} is empty: split needs CPUs on both sides")
        if not cpus <= allowed:
            raise PlacementError(f"{name} {sorted(cpus)} not within the allowed CPUs {sorted(allowed)}")
    if model_cpus & node_cpus:
        raise PlacementError(f"--model-cpus and --node-cpus share CPU(s) {sorted(model_cpus & node_cpus)}")
    return Placement("split", allowed, model_cpus, node_cpus)


def threads(pid: int) -> list[int]:
    """Every thread (task) of one process; a thread's affinity is its own, so each is pinned."""
    with contextlib.suppress(OSError):
        return [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    return []


def pin_process(pid: int, cpus: frozenset[int]) -> int:
    """Pin every thread of `pid` (not its children); returns how many threads were moved."""
    moved = 0
    for tid in threads(pid):
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            if os.sched_getaffinity(tid) != cpus:
                os.sched_setaffinity(tid, cpus)
                moved += 1
    return moved


def pin_tree(pid: int, cpus: frozenset[int]) -> None:
    """Pin every thread of `pid` and of all its descendants (model instance or frontend processes). New threads
    and children inherit their creator's set; one forked while the tree was being walked gets the next pass."""
    for _ in range(PIN_PASSES):
        if sum(pin_process(p, cpus) for p in process_tree(pid)) == 0:
            return


def read_back(pid: int, cpus: frozenset[int], tree: bool = True) -> dict[str, Any]:
    """The affinity each process of the tree (or the one process) reports, and whether each thread is on `cpus`."""
    pids: dict[str, list[int]] = {}
    n_threads = on_set = 0
    for p in process_tree(pid) if tree else [pid]:
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            pids[str(p)] = sorted(os.sched_getaffinity(p))
            for tid in threads(p):
                with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                    got = os.sched_getaffinity(tid)
                    n_threads += 1
                    on_set += int(got == cpus)
    return {
        "expected": sorted(cpus),
        "pids": pids,
        "threads": n_threads,
        "threads_on_set": on_set,
        "held": bool(pids) and on_set == n_threads,
    }
