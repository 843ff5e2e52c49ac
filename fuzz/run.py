"""Run a fuzz harness for a bounded time, seeded from ../shared/data, and record the result.

    python -m fuzz.run --seconds 300 --out fuzz/results/decode_image.json
    python -m fuzz.run --mutational --executions 1000000 --seconds 3000 --out fuzz/results/decode_image_mutational.json

The JSON says how many inputs ran, the coverage reached, and every finding (libFuzzer stops
at the first one; its input is kept under the work directory as crash-*/timeout-*/oom-*).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fuzz.seeds import REPO, write_corpus

# A Rust panic (pylibjpeg-rle on corrupt RLE) symbolises a backtrace when RUST_BACKTRACE is set,
# which inside the instrumented fuzzer costs enough memory to trip libFuzzer's OOM limit. Production
# images do not set it either.
_ENV = {**os.environ, "RUST_BACKTRACE": "0"}

# getrusage's peak RSS (what libFuzzer's -rss_limit_mb and our replay read) survives fork+exec: a fuzzer
# started straight from a test process that holds torch would "start" at gigabytes and report an OOM on
# its first input. A tiny trampoline process forks the real one, which then starts from a clean peak.
_TRAMPOLINE = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def _fresh_peak(cmd: list[str]) -> list[str]:
    return [sys.executable, "-c", _TRAMPOLINE, *cmd]


HARNESSES = {"decode_image": REPO / "fuzz" / "fuzz_decode_image.py"}
# Minimized inputs (<= 2 kB) of past campaigns' merged corpora, kept in git; full corpora stay under var/fuzz.
KEPT_CORPUS = REPO / "fuzz" / "corpus" / "decode_image"


def _last_int(pattern: str, text: str) -> int | None:
    found = re.findall(pattern, text)
    return int(found[-1]) if found else None


_REPLAY = """
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
limit = int(sys.argv[2]) << 20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from cxr_serving.errors import ImageRejectedError
from cxr_serving.images import DecodeLimits, decode_image
data = open(sys.argv[1], "rb").read()
started = time.perf_counter()
try:
    decode_image(data, "", DecodeLimits(max_pixels=5_000_000))
    outcome = "ok"
except ImageRejectedError as exc:
    outcome = exc.reason
seconds = time.perf_counter() - started
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps({"outcome": outcome, "seconds": round(seconds, 3), "peak_rss_mb": rss}))
"""


def replay(path: Path, *, rss_limit_mb: int = 2048, timeout_s: int = 10) -> dict[str, Any]:
    """Decode one input in a fresh, uninstrumented process under the same memory and time limits.
    Instrumented decoders are far slower and bigger, so resource findings are confirmed here."""
    try:
        proc = subprocess.run(
            _fresh_peak([sys.executable, "-c", _REPLAY, str(path), str(rss_limit_mb + 1024)]),
            cwd=REPO,
            env=_ENV,
            capture_output=True,
            text=True,
            timeout=timeout_s + 30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "why": f"still decoding after {timeout_s + 30} s"}
    if proc.returncode != 0:
        return {"ok": False, "why": f"exit {proc.returncode}: {proc.stderr[-1000:]}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ok = result["seconds"] < timeout_s and result["peak_rss_mb"] < rss_limit_mb
    return {"ok": ok, **result}


def run_fuzzer(
    name: str = "decode_image",
    *,
    seconds: int = 30,
    runs: int = -1,
    workdir: Path | None = None,
    small_seeds: bool = False,
    rss_limit_mb: int = 2048,
    timeout_s: int = 10,
    max_seed_bytes: int | None = None,
    keep_going: bool = False,
) -> dict[str, Any]:
    """`keep_going`: record every distinct exception (findings/) and go on, for long campaigns."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    corpus, seeds, artifacts = workdir / "corpus", workdir / "seeds", workdir / "artifacts"
    found = workdir / "findings"
    artifacts.mkdir(parents=True, exist_ok=True)
    corpus.mkdir(parents=True, exist_ok=True)
    n_seeds = write_corpus(seeds, small_only=small_seeds, max_bytes=max_seed_bytes)
    env = dict(_ENV)
    if keep_going:
        env["CXR_FUZZ_FINDINGS_DIR"] = str(found)
    cmd = [
        sys.executable,
        str(HARNESSES[name]),
        f"-max_total_time={seconds}",
        f"-runs={runs}",
        f"-rss_limit_mb={rss_limit_mb}",
        f"-timeout={timeout_s}",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
        str(corpus),
        str(seeds),
        *([str(KEPT_CORPUS)] if KEPT_CORPUS.is_dir() else []),
    ]
    started = time.monotonic()
    proc = subprocess.run(
        _fresh_peak(cmd), cwd=REPO, env=env, capture_output=True, text=True, timeout=seconds + 300, check=False
    )
    elapsed = time.monotonic() - started
    out = proc.stdout + proc.stderr
    findings = []
    for path in sorted(artifacts.iterdir()):
        kind = path.name.split("-", 1)[0]
        findings.append({"kind": kind, "input": str(path), "size": path.stat().st_size})
    tracebacks = re.findall(r"=== Uncaught Python exception: ===\n(.*?)(?:\n\n|==\d+==)", out, flags=re.S)
    for finding, tb in zip(findings, tracebacks, strict=False):
        finding["traceback"] = tb.strip()[-2000:]
    for finding in findings:
        if finding["kind"] in ("oom", "timeout", "slow"):  # resource findings: check them without instrumentation
            finding["replay"] = replay(Path(finding["input"]), rss_limit_mb=rss_limit_mb, timeout_s=timeout_s)
            finding["confirmed"] = not finding["replay"]["ok"]
        else:
            finding["confirmed"] = True
    for path in sorted(found.glob("*.bin")) if found.is_dir() else []:  # keep_going's findings
        tb = path.with_suffix(".txt")
        findings.append(
            {
                "kind": "exception",
                "input": str(path),
                "size": path.stat().st_size,
                "traceback": tb.read_text()[-2000:] if tb.exists() else "",
                "confirmed": True,
            }
        )
    oom_detail = re.findall(r"==\d+== ERROR: libFuzzer: out-of-memory \(([^)]*)\)", out)
    if oom_detail:
        for finding in findings:
            if finding["kind"] == "oom":
                finding["libfuzzer"] = oom_detail[-1]
    executions = _last_int(r"stat::number_of_executed_units:\s+(\d+)", out)
    if executions is None:
        executions = _last_int(r"#(\d+)\s", out)
    return {
        "harness": name,
        "target": "cxr_serving.images.decode_image",
        "contract": "only ImageRejectedError, or one finite float32 frame in [0, 1]",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}",
        "seconds": round(elapsed, 1),
        "max_total_time": seconds,
        "executions": executions,
        "exec_per_s": round((executions or 0) / elapsed, 1),
        "coverage_edges": _last_int(r"cov: (\d+)", out),
        "features": _last_int(r"ft: (\d+)", out),
        "corpus_inputs": _last_int(r"corp: (\d+)", out),
        "seed_inputs": n_seeds,
        "corpus_dir": str(corpus),
        "peak_rss_mb": _last_int(r"stat::peak_rss_mb:\s+(\d+)", out),
        "exit_code": proc.returncode,
        "findings": findings,
        "log_tail": out[-3000:] if proc.returncode != 0 else "",
    }


def run_mutational(
    *,
    workers: int = 1,
    executions: int = 1_000_000,
    seconds: int = 3600,
    workdir: Path,
    nice: int = 10,
    first_seed: int = 1,
) -> dict[str, Any]:
    """The uninstrumented mutational campaign (fuzz/mutate.py): `workers` processes, seed first_seed + i,
    `executions` in all; then `summarize_mutational`."""
    procs = []
    for i in range(workers):
        share = executions // workers + (1 if i < executions % workers else 0)
        cmd = [sys.executable, "-m", "fuzz.mutate", f"--seed={first_seed + i}", f"--executions={share}"]
        cmd += [f"--seconds={seconds}", f"--out={workdir / f'w{first_seed + i}'}"]
        procs.append(subprocess.Popen(["nice", "-n", str(nice), *cmd], cwd=REPO, env=_ENV))
    codes = [proc.wait() for proc in procs]
    summary = summarize_mutational(workdir)
    for i, code in enumerate(codes):
        if code not in (0, 3):  # 3: findings, recorded in stats.json; else a hang (watchdog), crash or kill
            died = workdir / f"w{first_seed + i}" / "current.bin"
            summary["findings"].append({"key": f"worker exit {code}", "input": str(died), "hits": 1})
    return summary


def summarize_mutational(workdir: Path) -> dict[str, Any]:
    """Sum every worker's stats.json under `workdir` (fractions are of all executions)."""
    workers = [json.loads(p.read_text()) for p in sorted(workdir.glob("w*/stats.json"))]
    total = sum(w["executions"] for w in workers)

    def fraction(field: str) -> dict[str, float]:
        keys = {k for w in workers for k in w[field]}
        return {
            k: round(sum(w[field].get(k, 0) * w["executions"] for w in workers) / max(total, 1), 4)
            for k in sorted(keys)
        }

    def count(field: str) -> dict[str, int]:
        keys = {k for w in workers for k in w[field]}
        return {k: sum(w[field].get(k, 0) for w in workers) for k in sorted(keys)}

    return {
        "mode": "mutational (fuzz/mutate.py), uninstrumented",
        "target": "cxr_serving.images.decode_image, default DecodeLimits",
        "contract": "ImageRejectedError, or one finite float32 frame in [0, 1]; else a finding",
        "executions": total,
        "workers": [
            {k: w[k] for k in ("seed", "executions", "seconds", "exec_per_s", "peak_rss_mb", "seed_files_by_source")}
            for w in workers
        ],
        "exec_per_s_all_workers": round(sum(w["exec_per_s"] for w in workers), 1),
        "executions_by_seed_source": count("executions_by_seed_source"),
        "sniffed_fraction": fraction("sniffed_fraction"),
        "past_sniffing_fraction": fraction("past_sniffing_fraction"),
        "decoded_fraction": fraction("decoded_fraction"),
        "outcomes": count("outcomes"),
        "findings": [f for w in workers for f in w["findings"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--harness", default="decode_image", choices=sorted(HARNESSES))
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--runs", type=int, default=-1)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--timeout", type=int, default=10, help="seconds one input may take (instrumented: ~50x slower)")
    ap.add_argument("--out", type=Path, help="write the JSON summary here")
    ap.add_argument("--max-seed-bytes", type=int, help="leave out seed files larger than this")
    ap.add_argument("--keep-going", action="store_true", help="record every distinct exception and go on")
    ap.add_argument("--mutational", action="store_true", help="the uninstrumented mutational campaign instead")
    ap.add_argument("--workers", type=int, default=1, help="--mutational: worker processes (nice 10)")
    ap.add_argument("--executions", type=int, default=1_000_000, help="--mutational: executions in all")
    ap.add_argument("--first-seed", type=int, default=1, help="--mutational: worker i uses seed first_seed + i")
    args = ap.parse_args()
    if args.mutational:
        workdir = args.workdir or REPO / "var" / "fuzz" / "mutational"
        summary = run_mutational(
            workers=args.workers,
            executions=args.executions,
            seconds=args.seconds,
            workdir=workdir,
            first_seed=args.first_seed,
        )
        if args.out:
            args.out.write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
        raise SystemExit(1 if summary["findings"] else 0)
    result = run_fuzzer(
        args.harness,
        seconds=args.seconds,
        runs=args.runs,
        workdir=args.workdir,
        timeout_s=args.timeout,
        max_seed_bytes=args.max_seed_bytes,
        keep_going=args.keep_going,
    )
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    raise SystemExit(1 if result["findings"] or result["exit_code"] else 0)


if __name__ == "__main__":
    main()
