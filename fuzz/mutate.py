"""Uninstrumented mutational fuzzing of `decode_image`: ~100x more executions than atheris here.

Without coverage feedback, random bytes die at the magic-byte check, so each execution starts from
a real seed (the kept corpus, past findings, small re-encodings of real radiographs and the shared
DICOMs), applies 1-8 mutations aimed at the headers, keeps the magic bytes most of the time and
repairs PNG chunk CRCs most of the time, so that inputs reach the PNG, JPEG and DICOM decoders.

    python -m fuzz.mutate --seed 1 --executions 2000 --seconds 20 --out var/fuzz/mutational/w1

Contract: a DecodedImage with one finite float32 frame in [0, 1], or ImageRejectedError. Any other
exception, a non-finite frame, a slow input or a peak RSS over the limit is a finding: its input and
traceback go to `<out>/findings/` (one per exception type and raising line) and fuzzing goes on.
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import io
import json
import os
import random
import resource
import signal
import struct
import time
import traceback
import warnings
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fuzz.seeds import DATA, REPO, shared_dicoms, shared_pngs

CORPUS = REPO / "fuzz" / "corpus" / "decode_image"
REGRESSIONS = REPO / "fuzz" / "regressions"
# Refusals decided before any decoder runs: an input refused with one of these never got past sniffing.
PRE_DECODE = {"IMAGE_EMPTY", "IMAGE_TOO_LARGE", "IMAGE_FORMAT_UNKNOWN", "CONTENT_TYPE_UNSUPPORTED"}
PRE_DECODE |= {"CONTENT_TYPE_MISMATCH", "IMAGE_FORMAT_NOT_ALLOWED"}
# What a client may send (gateway/services accept these or none).
CONTENT_TYPES = ("image/png", "image/jpeg", "image/jpg", "application/dicom", "image/dicom")
MATCHING = {"png": "image/png", "jpeg": "image/jpeg", "dcm": "application/dicom"}
MAGIC = {"png": (0, b"\x89PNG\r\n\x1a\n"), "jpeg": (0, b"\xff\xd8\xff"), "dcm": (128, b"DICM")}
INTERESTING_8 = (0, 1, 0x7F, 0x80, 0xFF)
INTERESTING_16 = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 64, 4096)
INTERESTING_32 = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x10000, 0xFFFF, 0x7FFF, 1 << 24)
SOURCE_WEIGHTS = {"corpus": 0.4, "nih_raster": 0.25, "nih_dicom_small": 0.2, "shared_dicom": 0.1, "regressions": 0.05}
HEAD = 2048  # most mutations land in the first bytes: headers, chunk/segment/element structure


def _sniff(data: bytes) -> str | None:
    from cxr_serving.images import sniff_format

    return sniff_format(data)


def _encode(img: Any, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _small_rasters(n: int = 4) -> list[bytes]:
    """Real NIH radiographs at 64-128 px, as 8/16-bit PNG and baseline/progressive JPEG."""
    from PIL import Image

    out = []
    for i, path in enumerate(shared_pngs(n)):
        side = (64, 80, 96, 128)[i % 4]
        img = Image.open(path).convert("L").resize((side, side + 8 * i))
        arr16 = np.asarray(img).astype(np.uint16) * 257
        out += [_encode(img, "PNG"), _encode(Image.fromarray(arr16), "PNG"), _encode(img, "JPEG", quality=75)]
        out += [_encode(img, "JPEG", progressive=True), _encode(img.convert("RGB"), "PNG")]
    return out


def _small_dicoms(side: int = 96) -> list[bytes]:
    """The shared uncompressed DICOMs with their pixel data cut to side x side (every header kept)."""
    import pydicom

    out = []
    for path in shared_dicoms():
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            continue
        step = max(1, int(ds.Rows) // side)
        arr = np.ascontiguousarray(ds.pixel_array[::step, ::step][:side, :side])
        ds.Rows, ds.Columns, ds.PixelData = arr.shape[0], arr.shape[1], arr.tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def load_seeds(shared: bool = True) -> list[tuple[str, bytes]]:
    """(source, bytes) for every seed; `shared` adds files built from or read in ../shared/data."""
    seeds = [("corpus", p.read_bytes()) for p in sorted(CORPUS.iterdir())]
    seeds += [("regressions", p.read_bytes()) for p in sorted(REGRESSIONS.iterdir())]
    if shared and DATA.is_dir():
        seeds += [("nih_raster", b) for b in _small_rasters()]
        seeds += [("nih_dicom_small", b) for b in _small_dicoms()]
        seeds += [("shared_dicom", p.read_bytes()) for p in shared_dicoms()]
    return seeds


class Mutator:
    """1-8 random mutations of one seed, biased to the header and keeping the format recognisable."""

    def __init__(self, rng: random.Random, seeds: list[tuple[str, bytes]]) -> None:
        self.rng, self.seeds = rng, seeds
        self.by_source: dict[str, list[bytes]] = {}
        for source, data in seeds:
            self.by_source.setdefault(source, []).append(data)

    def pick(self) -> tuple[str, bytes]:
        """A seed: its source by SOURCE_WEIGHTS (the 140 corpus files would otherwise drown the real images)."""
        sources = [s for s in SOURCE_WEIGHTS if s in self.by_source]
        source = self.rng.choices(sources, [SOURCE_WEIGHTS[s] for s in sources])[0]
        return source, self.rng.choice(self.by_source[source])

    def _pos(self, buf: bytearray) -> int:
        n = len(buf)
        return self.rng.randrange(min(n, HEAD)) if self.rng.random() < 0.7 or n <= HEAD else self.rng.randrange(n)

    def _span(self, buf: bytearray) -> tuple[int, int]:
        start = self._pos(buf)
        return start, min(len(buf), start + self.rng.choice((1, 2, 4, 8, 16, 64, 256)))

    def mutate(self, data: bytes) -> bytes:
        rng, buf = self.rng, bytearray(data)
        for _ in range(min(8, 1 + int(rng.expovariate(0.5)))):  # 1-8, mostly 1-3: deep enough to decode
            if not buf:
                break
            op, i = rng.randrange(11), self._pos(buf)
            if op == 0:
                buf[i] ^= 1 << rng.randrange(8)
            elif op == 1:
                buf[i] = rng.choice(INTERESTING_8)
            elif op in (2, 3) and i + 4 <= len(buf):
                size, values = (2, INTERESTING_16) if op == 2 else (4, INTERESTING_32)
                fmt = rng.choice("<>") + ("H" if size == 2 else "I")
                struct.pack_into(fmt, buf, i, rng.choice(values))
            elif op == 4 and buf[i : i + 1].isdigit():  # DICOM IS/DS and other numbers as text
                buf[i] = rng.choice(b"0123456789-.e+ \\")
            elif op == 5:  # insert random or copied bytes
                a, b = self._span(buf)
                chunk = bytes(buf[a:b]) if rng.random() < 0.5 else rng.randbytes(b - a)
                j = self._pos(buf)
                buf[j:j] = chunk
            elif op == 6:
                a, b = self._span(buf)
                del buf[a:b]
            elif op == 7:  # duplicate a chunk in place
                a, b = self._span(buf)
                buf[b:b] = buf[a:b]
            elif op == 8:
                del buf[rng.randrange(len(buf)) :]
            elif op == 9:  # splice with another seed
                _, other = rng.choice(self.seeds)
                buf = buf[: rng.randrange(len(buf) + 1)] + other[rng.randrange(len(other) + 1) :]
            else:  # overwrite with bytes from elsewhere in the input
                a, b = self._span(buf)
                j = self._pos(buf)
                buf[j : j + (b - a)] = buf[a:b]
        fmt = _sniff(data)
        if fmt and rng.random() < 0.95:  # keep the magic so the input reaches a decoder
            at, magic = MAGIC[fmt]
            if len(buf) >= at + len(magic):
                buf[at : at + len(magic)] = magic
        if fmt == "png" and rng.random() < 0.8:
            _fix_png_crcs(buf)
        return bytes(buf)


def _fix_png_crcs(buf: bytearray) -> None:
    """Rewrite every complete chunk's CRC, so that Pillow looks past its CRC check."""
    i = 8
    while i + 12 <= len(buf):
        (length,) = struct.unpack_from(">I", buf, i)
        end = i + 8 + length
        if end + 4 > len(buf):
            return
        struct.pack_into(">I", buf, end, zlib.crc32(buf[i + 4 : end]) & 0xFFFFFFFF)
        i = end + 4


class _Slow(BaseException):
    """Raised by the per-input alarm; a BaseException so that no library `except Exception` eats it."""


def _alarm(signum: int, frame: Any) -> None:
    raise _Slow


def check(data: bytes, content_type: str, limits: Any) -> str:
    """'ok' or the refusal reason; anything outside the contract raises."""
    from cxr_serving.errors import ImageRejectedError
    from cxr_serving.images import decode_image

    try:
        img = decode_image(data, content_type, limits)
    except ImageRejectedError as exc:
        if not exc.reason or not exc.message:
            raise AssertionError("refusal without a reason or message") from None
        return exc.reason
    p = img.pixels
    if not (isinstance(p, np.ndarray) and p.dtype == np.float32 and p.ndim == 2):
        raise AssertionError(f"decoded pixels are {type(p).__name__} {getattr(p, 'dtype', '')} {p.shape}")
    if min(p.shape) < limits.min_side or p.size > limits.max_pixels:
        raise AssertionError(f"decoded shape {p.shape} outside the limits")
    if not np.isfinite(p).all():
        raise AssertionError("decoded pixels are not finite")
    if p.min() < 0.0 or p.max() > 1.0:
        raise AssertionError(f"decoded pixels outside [0, 1]: {p.min()}..{p.max()}")
    return "ok"


def run_worker(
    seed: int,
    *,
    executions: int,
    seconds: float,
    out: Path,
    timeout_s: float = 10.0,
    rss_limit_mb: int = 2048,
    shared: bool = True,
) -> dict[str, Any]:
    """Fuzz until `executions` or `seconds`, whichever comes first; stats go to `<out>/stats.json`
    every 30 s and at the end, so that a killed campaign still reports what it ran."""
    import logging

    from cxr_serving.images import DecodeLimits

    warnings.simplefilter("ignore")
    os.environ["RUST_BACKTRACE"] = "0"  # as in production: a Rust panic's backtrace is slow and huge
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    out.mkdir(parents=True, exist_ok=True)
    findings_dir = out / "findings"
    rng = random.Random(seed)
    seeds = load_seeds(shared)
    mutator, limits = Mutator(rng, seeds), DecodeLimits()
    stats: dict[str, Any] = {"seed": seed, "executions": 0, "seconds": 0.0, "seeds": len(seeds)}
    by_source: Counter[str] = Counter(s for s, _ in seeds)
    used: Counter[str] = Counter()
    sniffed: Counter[str] = Counter()
    reached: Counter[str] = Counter()
    decoded: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    findings: dict[str, dict[str, Any]] = {}
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    current = os.open(out / "current.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # what a hard crash was eating
    old_handler = signal.signal(signal.SIGALRM, _alarm)
    started = last_save = time.monotonic()

    def save() -> dict[str, Any]:
        n = max(stats["executions"], 1)
        stats.update(
            seconds=round(time.monotonic() - started, 1),
            exec_per_s=round(stats["executions"] / max(time.monotonic() - started, 1e-9), 1),
            seed_files_by_source=dict(by_source),
            executions_by_seed_source=dict(used),
            sniffed_fraction={k: round(v / n, 4) for k, v in sorted(sniffed.items())},
            past_sniffing_fraction={k: round(v / n, 4) for k, v in sorted(reached.items())},
            past_sniffing_total=round(sum(reached.values()) / n, 4),
            decoded_fraction={k: round(v / n, 4) for k, v in sorted(decoded.items())},
            decoded_total=round(sum(decoded.values()) / n, 4),
            outcomes=dict(outcomes.most_common()),
            findings=list(findings.values()),
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        )
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        return stats

    try:
        while stats["executions"] < executions and time.monotonic() - started < seconds:
            source, base = mutator.pick()
            data = mutator.mutate(base)
            fmt = _sniff(data)
            ctype = (
                "" if rng.random() < 0.7 else MATCHING[fmt] if fmt and rng.random() < 0.8 else rng.choice(CONTENT_TYPES)
            )
            os.pwrite(current, data, 0)
            os.ftruncate(current, len(data))
            faulthandler.dump_traceback_later(timeout_s * 3, exit=True)  # a hang in C code the alarm cannot stop
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            t0 = time.monotonic()
            try:
                outcome = check(data, ctype, limits)
                signal.setitimer(signal.ITIMER_REAL, 0)
                took = time.monotonic() - t0
                if took > timeout_s:
                    raise _Slow
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
                if rss - base_rss > rss_limit_mb:
                    base_rss = rss  # report each new peak once
                    raise MemoryError(f"peak RSS grew to {rss} MB")
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # a finding: whatever fell outside the contract
                signal.setitimer(signal.ITIMER_REAL, 0)
                outcome = f"FINDING:{type(exc).__name__}"
                last = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
                key = f"{type(exc).__name__}@{last.filename}:{last.lineno}" if last else type(exc).__name__
                if key not in findings:
                    findings_dir.mkdir(exist_ok=True)
                    stem = f"{type(exc).__name__}-{hashlib.sha256(data).hexdigest()[:16]}"
                    (findings_dir / f"{stem}.bin").write_bytes(data)
                    (findings_dir / f"{stem}.txt").write_text(
                        f"content_type={ctype!r}\n" + "".join(traceback.format_exception(exc))
                    )
                    findings[key] = {
                        "key": key,
                        "input": str(findings_dir / f"{stem}.bin"),
                        "size": len(data),
                        "hits": 0,
                    }
                findings[key]["hits"] += 1
            stats["executions"] += 1
            used[source] += 1
            outcomes[outcome] += 1
            if fmt:
                sniffed[fmt] += 1
                if outcome not in PRE_DECODE:
                    reached[fmt] += 1
                if outcome == "ok":
                    decoded[fmt] += 1
            if time.monotonic() - last_save > 30:
                last_save = time.monotonic()
                save()
    except KeyboardInterrupt:  # SIGINT stops a campaign early; what ran is still recorded
        pass
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        os.close(current)
    return save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--executions", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds one input may take")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    stats = run_worker(
        args.seed, executions=args.executions, seconds=args.seconds, out=args.out, timeout_s=args.timeout
    )
    print(
        json.dumps(
            {k: stats[k] for k in ("executions", "seconds", "exec_per_s", "past_sniffing_total", "decoded_total")}
        )
    )
    raise SystemExit(3 if stats["findings"] else 0)  # 1 is the hang watchdog's (faulthandler) exit


if __name__ == "__main__":
    main()
