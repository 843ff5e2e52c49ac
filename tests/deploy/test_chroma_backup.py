"""The Chroma backup script the chart's CronJob runs (deploy/helm/cxr/files/chroma_backup.py):
back up a real persistent ChromaDB, restore it elsewhere, query it; retention deletes old
archives only."""

from __future__ import annotations

import datetime as dt
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.chart import CHART

SCRIPT = CHART / "files" / "chroma_backup.py"


@pytest.fixture(scope="module")
def backup_mod() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chroma_backup", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_backup_and_restore_a_live_chroma_store(tmp_path: Path) -> None:
    chromadb = pytest.importorskip("chromadb")
    from chromadb.config import Settings

    data, dest, restored = tmp_path / "data", tmp_path / "backup", tmp_path / "restored"
    client = chromadb.PersistentClient(path=str(data), settings=Settings(anonymized_telemetry=False))
    col = client.create_collection("medical_literature")
    col.add(ids=["a", "b"], embeddings=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], documents=["cardiomegaly", "effusion"])
    # the store stays open (as under the running server) while the CronJob copies it
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--source", str(data), "--dest", str(dest), "--retention-days", "30"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    archives = list(dest.glob("chroma-*.tar.gz"))
    assert len(archives) == 1 and not list(dest.glob("*.partial"))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--restore", str(archives[0]), "--target", str(restored)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    again = chromadb.PersistentClient(path=str(restored), settings=Settings(anonymized_telemetry=False))
    hit = again.get_collection("medical_literature").query(query_embeddings=[[0.0, 1.0, 0.0]], n_results=1)
    assert hit["documents"] == [["effusion"]]
    # restoring over a non-empty directory is refused
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--restore", str(archives[0]), "--target", str(restored)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "not empty" in proc.stderr


def test_retention_deletes_only_archives_older_than_the_window(backup_mod: ModuleType, tmp_path: Path) -> None:
    now = dt.datetime(2026, 3, 31, 2, 30, tzinfo=dt.UTC)
    names = {
        "chroma-20260228T023000Z.tar.gz": True,  # 31 days: deleted
        "chroma-20260302T023000Z.tar.gz": False,  # 29 days: kept
        "chroma-20260331T023000Z.tar.gz": False,
        "notes.txt": False,  # not ours: never touched
    }
    for n in names:
        (tmp_path / n).write_text("x")
    removed = {p.name for p in backup_mod.prune(tmp_path, 30, now)}
    assert removed == {n for n, gone in names.items() if gone}
    assert {p.name for p in tmp_path.iterdir()} == {n for n, gone in names.items() if not gone}
