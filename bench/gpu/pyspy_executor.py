"""Where the model executor's threads spend their time under load: py-spy samples the service process that
runs frontend processes (the executor) while a benchmark drives it, and the samples are summed per thread into
the functions that use the most (self time, and time below each of our own functions).

It waits for the executor to appear and to be busy (its event loop's thread at least `--busy` of a core over a
second: the measured cells, not the model's load), then records `--seconds` without
pausing it (`py-spy --nonblocking`), and then, with `--native-seconds`, another record with C frames, for which
py-spy pauses the process at every sample. A thread that
is stopped or waiting is not sampled (py-spy's default), so a paused peer's turn adds nothing.

    python -m bench.gpu.pyspy_executor --out DIR &      # beside `python -m bench.stack ...`
    python -m bench.gpu.pyspy_executor --summarise DIR/pyspy-executor.raw
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._common import stat_cpu_s, stat_fields

FRONTEND_MODULE = "cxr_serving.frontends"


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _parent(pid: int) -> int:
    fields = stat_fields(Path(f"/proc/{pid}/stat"))
    return int(fields[1]) if fields else 0


def _stopped(pid: int) -> bool:
    fields = stat_fields(Path(f"/proc/{pid}/stat"))
    return fields is None or fields[0] == "T"


def find_executor() -> int | None:
    """The running process with the most frontend processes as children (None when there is none yet): a peer
    the benchmark has paused (SIGSTOP) is passed over."""
    children: collections.Counter[int] = collections.Counter()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and FRONTEND_MODULE in _cmdline(int(entry.name)):
            children[_parent(int(entry.name))] += 1
    running = [(n, pid) for pid, n in children.items() if not _stopped(pid)]
    return max(running)[1] if running else None


def wait_busy(busy: float, timeout_s: float) -> int | None:
    """The executor's pid once its main thread (the event loop, which serves the frontends' requests; models
    load on other threads) used at least `busy` of a core over one second (None at the timeout)."""
    deadline = time.monotonic() + timeout_s
    said = 0.0  # when the last progress line went out: a run that records nothing says what it saw
    while time.monotonic() < deadline:
        pid = find_executor()
        seen = "no process with frontend children yet"
        if pid is not None:
            before = stat_cpu_s(pid, tid=pid)
            time.sleep(1.0)
            used = stat_cpu_s(pid, tid=pid) - before
            if used >= busy:
                print(f"executor {pid}: main thread at {used:.2f} of a core; recording", file=sys.stderr, flush=True)
                return pid
            seen = f"executor {pid}: main thread at {used:.2f} of a core (< {busy})"
        else:
            time.sleep(0.5)
        if time.monotonic() - said >= 10.0:
            print(f"waiting: {seen}", file=sys.stderr, flush=True)
            said = time.monotonic()
    return None


def summarise(raw: Path, top: int = 15) -> dict[str, Any]:
    """Per thread of py-spy's raw output (`--threads --format raw`): samples, and the functions with the most
    self samples and the most samples below them (each counted once per stack)."""
    threads: dict[str, dict[str, Any]] = {}
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        t = threads.setdefault(thread, {"samples": 0, "self": collections.Counter(), "total": collections.Counter()})
        t["samples"] += count
        if frames:
            t["self"][frames[-1]] += count
        for frame in set(frames):
            t["total"][frame] += count
    out: dict[str, Any] = {}
    for thread, t in sorted(threads.items(), key=lambda kv: -kv[1]["samples"]):
        out[thread] = {
            "samples": t["samples"],
            "self": [[f, n, round(n / t["samples"], 3)] for f, n in t["self"].most_common(top)],
            "total": [[f, n, round(n / t["samples"], 3)] for f, n in t["total"].most_common(top * 2)],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for pyspy-executor.raw and pyspy-executor.json")
    ap.add_argument("--seconds", type=float, default=15.0, help="how long to record")
    ap.add_argument("--rate", type=int, default=200, help="samples per second")
    ap.add_argument("--busy", type=float, default=0.5, help="share of a core that marks the executor as loaded")
    ap.add_argument("--wait", type=float, default=240.0, help="seconds to wait for a loaded executor")
    native = "then record this long with C frames too (uvloop, torch); py-spy pauses the process for it"
    ap.add_argument("--native-seconds", type=float, default=0.0, help=native)
    ap.add_argument("--summarise", type=Path, help="only summarise this raw file")
    args = ap.parse_args(argv)
    if args.summarise:
        print(json.dumps(summarise(args.summarise), indent=1))
        return 0
    if args.out is None:
        ap.error("--out is required unless --summarise")
    spy = os.environ.get("PYSPY") or shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print(f"py-spy not found ({spy}); nothing recorded", file=sys.stderr)
        return 2
    pid = wait_busy(args.busy, args.wait)
    if pid is None:
        print(f"no loaded executor within {args.wait} s; nothing recorded", file=sys.stderr)
        return 3
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"pid": pid, "rate": args.rate}
    runs = [("pyspy-executor", args.seconds, [])]
    if args.native_seconds > 0:  # py-spy pauses the process to unwind C frames: a second, shorter record
        runs.append(("pyspy-executor-native", args.native_seconds, ["--native"]))
    for name, seconds, extra in runs:
        raw = args.out / f"{name}.raw"
        blocking = [] if extra else ["--nonblocking"]
        cmd = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(args.rate),
               "--threads", "--format", "raw", "--output", str(raw), *blocking, *extra]  # fmt: skip
        print("recording:", " ".join(cmd), flush=True)
        try:
            done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            print(f"{name}: py-spy did not finish within {seconds + 60} s", flush=True)
            continue
        print(done.stdout[-2000:], done.stderr[-2000:], flush=True)
        if not raw.exists():
            continue
        summary[name] = {"seconds": seconds, "native": bool(extra), "threads": summarise(raw)}
        for thread, t in list(summary[name]["threads"].items())[:4]:
            print(name, thread, t["samples"], "samples; self:", t["self"][:8], flush=True)
    (args.out / "pyspy-executor.json").write_text(json.dumps(summary, indent=1))
    return 0 if len(summary) > 2 else 4


if __name__ == "__main__":
    sys.exit(main())
