"""Helpers for tests of a service with frontend processes: which frontend process took a channel's
connection (read from /proc: the socket it accepted), the frontends' pids, and the node's /metrics."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families


def child_pids(pid: int) -> list[int]:
    """The live children of `pid` (the frontend processes of a node's parent process)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry.name))
    return sorted(out)


def wait_children(pid: int, count: int, timeout: float = 60.0, exclude: Iterable[int] = ()) -> list[int]:
    """Wait until `pid` has `count` live children, none of them in `exclude`."""
    deadline = time.monotonic() + timeout
    gone = set(exclude)
    while time.monotonic() < deadline:
        pids = child_pids(pid)
        if len(pids) == count and not gone & set(pids):
            return pids
        time.sleep(0.05)
    raise TimeoutError(f"process {pid} has children {child_pids(pid)}, not {count} new ones, after {timeout}s")


def socket_inodes(pid: int) -> set[str]:
    out = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir() if fd_dir.exists() else ():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


def open_channel_on(target: str, frontends: list[int], timeout: float = 20.0) -> tuple[grpc.Channel, int]:
    """A new channel (its own TCP connection) and the pid of the frontend that accepted it: the one whose
    socket count grew (tried again when that is not exactly one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = {pid: socket_inodes(pid) for pid in frontends}
        channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        grpc.channel_ready_future(channel).result(timeout=timeout)
        settle = time.monotonic() + 1.0
        while time.monotonic() < settle:
            gained = [pid for pid in frontends if socket_inodes(pid) - before[pid]]
            if len(gained) == 1:
                return channel, gained[0]
            if len(gained) > 1:
                break
            time.sleep(0.01)
        channel.close()
    raise RuntimeError(f"could not tell which frontend accepted a connection in {timeout}s")


def scrape(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """Every sample called `name` whose labels include `labels`."""
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out.append((dict(s.labels), float(s.value)))
    return out


def total(text: str, name: str, **labels: str) -> float:
    return sum(v for _, v in samples(text, name, **labels))


def wait_metric(port: int, name: str, want: float, timeout: float = 10.0, **labels: str) -> str:
    """/metrics once `name` sums to `want` (frontends push theirs every second), or at `timeout` as it is."""
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(port)
        if total(text, name, **labels) == want or time.monotonic() > deadline:
            return text
        time.sleep(0.2)
