"""Pieces every whole-stack benchmark shares: images, load drivers, server processes, results.

- `closed_loop`: N concurrent callers back to back (throughput and latency at a concurrency);
- `open_loop`: a fixed arrival rate whatever the answers (latency under load, shedding);
- `ServerProcess`: a server in its own process, time to READY, RSS of its process tree;
- `summarize`: img/s, p50/p99 and the outcome of every call by status code.
Every loop is bounded by a call count AND a time budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench._revision import source_revision

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CXR_SHARED_DIR", REPO.parent / "shared"))
IMAGES = SHARED / "data" / "cxr14-sample" / "images"
PUBMEDQA = SHARED / "data" / "pubmedqa"
RESULTS = REPO / "bench" / "results"
GPU_RESULTS = REPO / "bench" / "gpu" / "results"
API_KEY = "bench-key-0123456789"

Call = Callable[[int], Awaitable[object]]


# -- inputs ------------------------------------------------------------------------------------
def nih_pngs(n: int) -> list[bytes]:
    paths = sorted(IMAGES.glob("*.png"))[:n]
    if not paths:
        raise SystemExit(f"no NIH PNGs under {IMAGES} (set CXR_SHARED_DIR)")
    return [p.read_bytes() for p in paths]


# The input formats `bench.stack` measures the serving path with, and their gRPC content types.
INPUT_FORMATS = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "dcm": "application/dicom",
    "dcm_jpeg": "application/dicom",
    "dcm12": "application/dicom",
}
DICOM_TEMPLATES = {  # shared DICOMs whose headers carry a transcoded NIH image (uncompressed, JPEG baseline, 12-bit)
    "dcm": SHARED / "data" / "dicom" / "nih-dx-mono2-8bit.dcm",
    "dcm_jpeg": SHARED / "data" / "dicom" / "siim-cxr-mono2-jpeg-baseline.dcm",
    "dcm12": SHARED / "data" / "dicom" / "nih-dx-mono2-12bit-window.dcm",  # 16 allocated, 12 stored, a full window
}


def nih_inputs(fmt: str, n: int) -> list[bytes]:
    """The first `n` NIH PNGs as `fmt` (INPUT_FORMATS): PNG as they are; JPEG at quality 90; DICOM with the
    8-bit pixels uncompressed, or the JPEG encapsulated (JPEG baseline), or the pixels spread to 12 bits
    (v * 16 + v // 16, uncompressed; its window makes the decoder's image float32), in a shared DICOM's header."""
    pngs = nih_pngs(n)
    if fmt == "png":
        return pngs
    from PIL import Image

    def jpeg(png: bytes) -> bytes:
        out = io.BytesIO()
        with Image.open(io.BytesIO(png)) as im:
            im.convert("L").save(out, format="JPEG", quality=90)
        return out.getvalue()

    if fmt == "jpeg":
        return [jpeg(p) for p in pngs]
    import pydicom
    from pydicom.encaps import encapsulate

    out = []
    for png in pngs:
        ds = pydicom.dcmread(DICOM_TEMPLATES[fmt])
        with Image.open(io.BytesIO(png)) as im:
            pixels = np.asarray(im.convert("L"))
        ds.Rows, ds.Columns = pixels.shape
        if fmt == "dcm":
            ds.PixelData = pixels.tobytes()
        elif fmt == "dcm12":
            wide = pixels.astype(np.uint16)
            ds.PixelData = (wide * 16 + wide // 16).astype("<u2").tobytes()
        else:
            ds.PixelData = encapsulate([jpeg(png)])
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def resized_png(data: bytes, side: int) -> bytes:
    """The same radiograph re-encoded as a side x side PNG (cost growth with input size)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        out = io.BytesIO()
        im.convert("L").resize((side, side), Image.Resampling.BILINEAR).save(out, format="PNG")
    return out.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- outcomes ----------------------------------------------------------------------------------
class HttpStatusError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def outcome(exc: BaseException) -> str:
    """One name per failure kind: the gRPC code, HTTP_<status>, or TIMEOUT."""
    code = getattr(exc, "code", None)
    if callable(code):
        return str(code().name)
    if isinstance(exc, HttpStatusError):
        return f"HTTP_{exc.status}"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "TIMEOUT"
    return type(exc).__name__


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values), q)), 3) if values else None


@dataclass
class Recorder:
    """Latency (ms) of every call, by outcome ('OK' or a failure name)."""

    latencies: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, ms: float) -> None:
        self.latencies.setdefault(name, []).append(ms)

    @property
    def ok(self) -> list[float]:
        return self.latencies.get("OK", [])

    def codes(self) -> dict[str, int]:
        return dict(Counter({k: len(v) for k, v in self.latencies.items()}))

    async def timed(self, call: Call, i: int, timeout: float) -> None:
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(call(i), timeout)
            name = "OK"
        except Exception as exc:  # every failure is an outcome to count, not a crash
            name = outcome(exc)
        self.add(name, (time.perf_counter() - t0) * 1000)


def summarize(rec: Recorder, wall_s: float, **extra: Any) -> dict[str, Any]:
    ok = rec.ok
    return {
        **extra,
        "requests": len(ok),
        "codes": rec.codes(),
        "seconds": round(wall_s, 3),
        "img_per_s": round(len(ok) / wall_s, 3) if wall_s > 0 else 0.0,
        "p50_ms": percentile(ok, 50),
        "p99_ms": percentile(ok, 99),
    }


# -- load drivers ------------------------------------------------------------------------------
async def closed_loop(
    call: Call, concurrency: int, *, max_requests: int, max_seconds: float, warmup: int = 0, timeout: float = 120
) -> dict[str, Any]:
    """`concurrency` callers, each sending its next request when the previous one is answered."""
    for i in range(warmup):
        await asyncio.gather(*(call(i * concurrency + k) for k in range(concurrency)))
    rec = Recorder()
    wall = await drive_closed(
        call, concurrency, rec, max_requests=max_requests, max_seconds=max_seconds, timeout=timeout
    )
    return summarize(rec, wall, concurrency=concurrency)


async def drive_closed(
    call: Call, concurrency: int, rec: Recorder, *, max_requests: int, max_seconds: float, timeout: float = 120
) -> float:
    """The closed loop itself, recording into `rec` (cells of one measurement may add up); returns the wall time."""
    budget = iter(range(max(max_requests, concurrency)))
    started = time.perf_counter()
    stop_at = started + max_seconds

    async def caller() -> None:
        for i in budget:
            if time.perf_counter() > stop_at:
                return
            await rec.timed(call, i, timeout)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - started


async def open_loop(
    call: Call, rate_per_s: float, *, max_requests: int, max_seconds: float, timeout: float
) -> dict[str, Any]:
    """Send at a fixed arrival rate for `max_seconds` (at most `max_requests`), whatever the answers.

    The latency of failures is kept by outcome: shed calls (RESOURCE_EXHAUSTED, HTTP 429/503)
    should come back fast; TIMEOUT counts calls still unanswered after `timeout` seconds.
    """
    rec = Recorder()
    n = max(1, min(max_requests, int(rate_per_s * max_seconds)))
    interval = 1.0 / rate_per_s
    started = time.perf_counter()
    tasks = []
    for i in range(n):
        delay = started + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(rec.timed(call, i, timeout)))
    sent_s = time.perf_counter() - started
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - started
    result = summarize(rec, wall, offered_per_s=round(rate_per_s, 3), sent=n, achieved_send_per_s=round(n / sent_s, 3))
    shed = [ms for name, v in rec.latencies.items() if name in SHED_CODES for ms in v]
    result["shed"] = len(shed)
    result["time_to_shed_p50_ms"] = percentile(shed, 50)
    result["time_to_shed_p99_ms"] = percentile(shed, 99)
    result["ok_per_s"] = round(len(rec.ok) / wall, 3)
    return result


SHED_CODES = ("RESOURCE_EXHAUSTED", "HTTP_429", "HTTP_503")


async def interleaved(calls: dict[str, Call], *, rounds: int, max_seconds: float, warmup: int = 3) -> dict[str, Any]:
    """Concurrency 1, the paths taken in turn call by call: host noise hits every path alike, so
    differences of a few ms (what a proxy adds) survive a busy machine. The order rotates every round
    (round i starts with path i mod n): in a fixed order, the path that always ran second was 0.6-0.9 ms
    faster than an identical service run first (bench/README.md, "What the service adds at
    concurrency 1")."""
    recs = {name: Recorder() for name in calls}
    names = list(calls)
    for i in range(warmup):
        for call in calls.values():
            await call(i)
    stop_at = time.perf_counter() + max_seconds
    for i in range(rounds):
        if time.perf_counter() > stop_at:
            break
        k = i % len(names)
        for name in names[k:] + names[:k]:
            await recs[name].timed(calls[name], i, 120)
    out = {name: summarize(rec, sum(rec.ok) / 1000 or 1.0, concurrency=1) for name, rec in recs.items()}
    out["calls_ms"] = {name: [round(x, 3) for x in rec.ok] for name, rec in recs.items()}  # in round order
    return out


def paired_p50(first: list[float], second: list[float]) -> float | None:
    """Median of second[i] - first[i] over interleaved rounds (None unless every call of both answered):
    what the second path adds, with the variation between images and rounds cancelled."""
    if not first or len(first) != len(second):  # a failed call would pair the wrong rounds
        return None
    return round(float(np.median([b - a for a, b in zip(first, second, strict=True)])), 3)


# -- server processes --------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """`pid` and all its live descendants (LitServe and instance processes run several), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


_POLICY_NAMES = {
    0: "SCHED_OTHER", 1: "SCHED_FIFO", 2: "SCHED_RR", 3: "SCHED_BATCH", 5: "SCHED_IDLE", 6: "SCHED_DEADLINE"
}  # fmt: skip


def thread_policies(pid: int) -> dict[str, int]:
    """How many threads of `pid`'s process tree run under each CPU scheduling policy, read from the kernel: what
    `server_config.cpu_scheduling` put in effect (or an override such as CXR_SERVER_CONFIG__CPU_SCHEDULING)."""
    counts: Counter[str] = Counter()
    for p in process_tree(pid):
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except OSError:  # a process that ended meanwhile
            continue
        for tid in tids:
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                policy = os.sched_getscheduler(tid) & ~getattr(os, "SCHED_RESET_ON_FORK", 0)
                counts[_POLICY_NAMES.get(policy, str(policy))] += 1
    return dict(sorted(counts.items()))


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants."""
    total_kb = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
    return round(total_kb / 1024, 1)


def gpu_mib_by_pid() -> dict[int, float]:
    """GPU memory each process holds, from `nvidia-smi` ({} without NVIDIA's tool or a GPU)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=15, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    table: dict[int, float] = {}
    for line in out.splitlines():
        with contextlib.suppress(ValueError):
            pid, mib = (f.strip() for f in line.split(","))
            table[int(pid)] = table.get(int(pid), 0.0) + float(mib)
    return table


def tree_gpu_mib(pid: int, table: dict[int, float]) -> float | None:
    """GPU memory of a process and its descendants (None when `table` is empty: nothing to read)."""
    if not table:
        return None
    return round(sum(table.get(p, 0.0) for p in process_tree(pid)), 1)


def own_cpu_s() -> float:
    """CPU seconds of this process alone (every thread, not its children: the load generator or the ceiling), at
    the clock's resolution rather than os.times()' 10 ms ticks, which round a short run's share to zero."""
    return time.process_time()


def stat_fields(path: Path) -> list[str] | None:
    """The fields of a /proc stat file after the command name (the state first), or None once it is gone."""
    try:
        return path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cpu_s(fields: list[str]) -> float:
    """utime + stime of `stat_fields`, in seconds."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stat_cpu_s(pid: int, tid: int | None = None) -> float:
    """CPU seconds of process `pid` (every thread, not its children), or of its thread `tid`, from /proc."""
    fields = stat_fields(Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"))
    return _cpu_s(fields) if fields else 0.0


def thread_cpu_s(pids: list[int]) -> dict[tuple[int, int], tuple[str, float]]:
    """CPU seconds of every thread of these processes (not their children), by (pid, tid), with the
    thread's kernel name (`main` for a process's first thread): what shows one thread's limit (an event
    loop, a model thread, the GIL), which a process's total hides."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = (task / "stat").read_text()
                    name = stat[stat.index("(") + 1 : stat.rindex(")")]
                    tid = int(task.name)
                    out[(pid, tid)] = ("main" if tid == pid else name, _cpu_s(stat.rsplit(")", 1)[1].split()))
    return out


def add_thread_cpu(
    spent: dict[tuple[int, int], tuple[str, float]],
    before: dict[tuple[int, int], tuple[str, float]],
    after: dict[tuple[int, int], tuple[str, float]],
) -> None:
    """Add each thread's CPU between two `thread_cpu_s` readings into `spent` (a cell's rounds add up)."""
    for key, (name, cpu) in after.items():
        delta = cpu - before.get(key, (name, 0.0))[1]
        if delta > 0:
            spent[key] = (name, spent.get(key, (name, 0.0))[1] + delta)


def busiest_threads(
    spent: dict[tuple[int, int], tuple[str, float]], answered: int, wall_s: float, top: int = 4
) -> list[dict[str, Any]]:
    """The `top` threads of `spent` (`add_thread_cpu`) by CPU: name, CPU ms per answer and the share of one
    core each used over `wall_s` (near 1.0: that thread is a bound)."""
    used = sorted(((s, name, key[1]) for key, (name, s) in spent.items()), reverse=True)
    return [
        {
            "thread": name,
            "tid": tid,
            "ms_per_answer": round(1000 * s / max(answered, 1), 3),
            "core_share": round(s / wall_s, 3) if wall_s > 0 else None,
        }
        for s, name, tid in used[:top]
    ]


def tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system, every thread, and the children already reaped) of these processes
    and all their descendants: what a cell cost each side, read before and after it."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in {q for pid in pids for q in process_tree(pid)}:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / tick


class ServerProcess:
    """`cmd` in its own process; `await wait_ready(probe)` returns the seconds to READY."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None, name: str = "") -> None:
        self.cmd = cmd
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.name = name or cmd[-1]
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.peak_rss_mb = 0.0

    def start(self) -> ServerProcess:
        self.started = time.perf_counter()
        self.log = tempfile.TemporaryFile()  # a pipe nobody reads would block a chatty server
        self.proc = subprocess.Popen(
            self.cmd, cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )  # its own process group: stop() ends the workers a server forks (LitServe) with it
        return self

    async def wait_ready(self, probe: Callable[[], Awaitable[bool]], timeout: float = 240) -> float:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(Exception):
                if await probe():
                    return round(time.perf_counter() - self.started, 3)
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout} s")

    def log_tail(self, chars: int = 3000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-chars:]

    def rss_mb(self) -> float:
        return tree_rss_mb(self.proc.pid) if self.proc is not None else 0.0

    def thread_policies(self) -> dict[str, int]:
        """Threads per CPU scheduling policy (`thread_policies`); {} before start or after exit."""
        return thread_policies(self.proc.pid) if self.proc is not None and self.proc.poll() is None else {}

    @contextlib.asynccontextmanager
    async def sampling_rss(self, every_s: float = 0.25) -> Any:
        """Track the peak RSS of the process tree while the body runs; yields a dict filled at exit."""
        peak = {"rss_peak_mb": self.rss_mb()}

        async def sample() -> None:
            while True:
                peak["rss_peak_mb"] = max(peak["rss_peak_mb"], self.rss_mb())
                await asyncio.sleep(every_s)

        task = asyncio.ensure_future(sample())
        try:
            yield peak
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            peak["rss_peak_mb"] = max(peak["rss_peak_mb"], self.rss_mb())

    def pause(self) -> None:
        """SIGSTOP the whole process group: an idle server that polls (LitServe's workers spin at ~0.1
        core each) then takes no CPU from the one being measured. Connections stay open."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM to the server's process group (graceful drain), SIGKILL to whatever is left after 30 s."""
        if self.proc is None:
            return
        self.resume()  # a stopped group would not act on SIGTERM
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_alive(self.proc.pid):
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()


@contextlib.contextmanager
def only_running(servers: Iterable[ServerProcess], wanted: Iterable[ServerProcess]) -> Iterator[None]:
    """Pause every server but `wanted` for the body (one peer measured at a time), resume them after."""
    keep = {id(s) for s in wanted}
    paused = [s for s in servers if id(s) not in keep]
    for s in wanted:
        s.resume()
    for s in paused:
        s.pause()
    try:
        yield
    finally:
        for s in paused:
            s.resume()


def stop_on_sigterm() -> None:
    """SIGTERM ends a benchmark like Ctrl-C: the `finally` blocks stop the servers it started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


async def grpc_serving(port: int) -> bool:
    """gRPC health (service '') reports SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


async def http_ok(url: str) -> bool:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
        return r.status == 200


# -- results -----------------------------------------------------------------------------------
def environ_of(pid: int, names: Sequence[str]) -> dict[str, str | None]:
    """The values of `names` in a running process's environment, as /proc/<pid>/environ holds it (None: unset,
    or the process is gone)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return dict.fromkeys(names)
    pairs = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
    return {name: pairs.get(name) for name in names}


def machine() -> dict[str, Any]:
    import platform

    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def write_result(name: str, data: dict[str, Any], out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    data = {"benchmark": name, "when": when, "source": source_revision(), **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}", flush=True)
    return path


@contextlib.contextmanager
def stage(title: str) -> Iterator[None]:
    t0 = time.perf_counter()
    print(f"-- {title}", flush=True)
    yield
    print(f"   ({time.perf_counter() - t0:.0f} s)", file=sys.stdout, flush=True)
