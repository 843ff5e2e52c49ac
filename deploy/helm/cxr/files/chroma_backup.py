"""Back up (or restore) a ChromaDB persist directory: one timestamped .tar.gz per run.

Run by the chart's CronJob on the node where Chroma runs, with the data volume mounted
read-only. SQLite files are copied with SQLite's online backup API (a consistent snapshot
even while Chroma writes); the HNSW segment files next to them are copied as they are.
Archives older than --retention-days (by the timestamp in their name) are deleted.

  python3 backup.py --source /data --dest /backup --retention-days 30
  python3 backup.py --restore /backup/chroma-20260101T023000Z.tar.gz --target /data

Standard library only (runs on python:3.11-slim).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sqlite3
import sys
import tarfile
import tempfile
from pathlib import Path

ARCHIVE_RE = re.compile(r"^chroma-(\d{8}T\d{6}Z)\.tar\.gz$")
STAMP = "%Y%m%dT%H%M%SZ"


def _sqlite_snapshot(src: Path, dst: Path) -> None:
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    target = sqlite3.connect(dst)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()


def backup(source: Path, dest: Path, now: dt.datetime) -> Path:
    if not source.is_dir():
        raise SystemExit(f"backup: source {source} is not a directory")
    dest.mkdir(parents=True, exist_ok=True)
    name = f"chroma-{now.strftime(STAMP)}.tar.gz"
    final = dest / name
    partial = dest / (name + ".partial")
    with tempfile.TemporaryDirectory() as scratch, tarfile.open(partial, "w:gz") as tar:
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source)
            if path.is_dir() or path.name.endswith(("-wal", "-shm", "-journal")):
                continue
            if path.suffix in (".sqlite3", ".sqlite", ".db"):
                snap = Path(scratch) / rel.name
                _sqlite_snapshot(path, snap)
                tar.add(snap, arcname=str(rel))
            else:
                tar.add(path, arcname=str(rel))
    os.replace(partial, final)
    return final


def prune(dest: Path, retention_days: int, now: dt.datetime) -> list[Path]:
    cutoff = now - dt.timedelta(days=retention_days)
    removed = []
    for path in sorted(dest.iterdir()):
        m = ARCHIVE_RE.match(path.name)
        if m and dt.datetime.strptime(m.group(1), STAMP).replace(tzinfo=dt.UTC) < cutoff:
            path.unlink()
            removed.append(path)
    return removed


def restore(archive: Path, target: Path) -> None:
    if target.exists() and any(target.iterdir()):
        raise SystemExit(f"restore: target {target} is not empty; stop Chroma and empty it first")
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(target, filter="data")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, help="Chroma persist directory")
    ap.add_argument("--dest", type=Path, help="directory of the archives")
    ap.add_argument("--retention-days", type=int, default=30)
    ap.add_argument("--restore", type=Path, help="archive to restore")
    ap.add_argument("--target", type=Path, help="empty directory to restore into")
    args = ap.parse_args(argv)
    if args.restore:
        if args.target is None:
            ap.error("--restore needs --target")
        restore(args.restore, args.target)
        print(f"restored {args.restore} into {args.target}")
        return 0
    if args.source is None or args.dest is None:
        ap.error("--source and --dest are required")
    now = dt.datetime.now(dt.UTC)
    archive = backup(args.source, args.dest, now)
    print(f"wrote {archive} ({archive.stat().st_size} bytes)")
    for path in prune(args.dest, args.retention_days, now):
        print(f"deleted {path} (older than {args.retention_days} days)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
