"""`cxr-rag`: ingest documents, show store statistics, back up and restore the vector store.

    cxr-rag --config config/local.json ingest ../shared/data/pubmedqa/corpus.jsonl docs/
    cxr-rag stats                        # also: what computes embeddings (openvino/bfloat16, or torch and why)
    cxr-rag backup /backups/chroma-2024-06-01
    cxr-rag restore /backups/chroma-2024-06-01

`ingest` shows a progress bar and is resumable: stop it (Ctrl-C, kill) and run it again, and it
embeds only the chunks not yet stored, without duplicates. Works against the embedded store
(`vector_db_path`) or a Chroma server (`VECTOR_DB_HOST`).
Backups are logical snapshots through the Chroma API (consistent while the service serves;
see store.py); with the embedded store, stop the service first or back up from the server.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxr_rag.config import RagConfig, rag_config
from cxr_rag.ingest import count_documents, read_documents
from cxr_rag.runtime import RagRuntime
from cxr_serving.errors import ConfigError, CxrError
from cxr_serving.settings import load_settings


def _runtime(config: str | None) -> RagRuntime:
    settings = load_settings(config)
    cfg = rag_config(settings).model_copy(update={"ingest_on_start": False})
    return RagRuntime(cfg)


def ingest_into(
    rt: RagRuntime, paths: Sequence[Path], limit: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Ingest `paths` with an opened runtime: totals, chunks/s of this run and what computed the embeddings."""
    assert rt.store is not None and rt.ingest_embedder is not None
    total: dict[str, float] = {}
    for path in paths:
        docs = read_documents(Path(path), limit)
        stats = rt.ingest(docs, progress=progress, rebuild=False, total_documents=count_documents(Path(path), limit))
        for key, value in stats.as_dict().items():
            total[key] = total.get(key, 0) + value
    seconds = total.get("seconds", 0.0)
    return {
        **total,
        "chunks_per_s": round(total.get("chunks_added", 0) / seconds, 1) if seconds else 0.0,
        "chunks_total": rt.store.count(),
        "embedder": rt.ingest_embedder.status(),
    }


def ingest_corpus(
    paths: Path | Sequence[Path],
    *,
    config: str | None = None,
    cfg: RagConfig | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """What `cxr-rag ingest` does, as a function (the scale bench calls it): the store and embedder of `cfg`
    (else of the JSON `config`), a progress bar, resumable; returns the totals of `ingest_into`."""
    rt = RagRuntime(cfg.model_copy(update={"ingest_on_start": False})) if cfg is not None else _runtime(config)
    rt.open(progress=progress, build_index=False)
    return ingest_into(rt, [Path(paths)] if isinstance(paths, str | Path) else list(paths), limit, progress)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cxr-rag", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", help="JSON config (default: $CXR_CONFIG_PATH; CXR_* env overrides apply)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sub = ap.add_subparsers(dest="command", required=True)
    p_ing = sub.add_parser("ingest", help="ingest JSONL, text, Markdown or PDF files / directories")
    p_ing.add_argument("paths", nargs="+", type=Path)
    p_ing.add_argument("--limit", type=int, help="only the first N records of each JSONL file")
    sub.add_parser("stats", help="collection, embedding model, chunk count")
    p_bak = sub.add_parser("backup", help="write a consistent snapshot to a new directory")
    p_bak.add_argument("dest", type=Path)
    p_res = sub.add_parser("restore", help="load a snapshot made by `backup` into the configured collection")
    p_res.add_argument("src", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    try:
        rt = _runtime(args.config)
        rt.open(progress=not args.quiet, build_index=False)
        assert rt.store is not None
        if args.command == "ingest":
            out: dict[str, object] = ingest_into(rt, args.paths, args.limit, not args.quiet)
        elif args.command == "stats":
            out = {**rt.store.stats(), "embedder": rt.embedder.status() if rt.embedder else {}}
        elif args.command == "backup":
            out = rt.store.backup(args.dest)
        else:
            out = rt.store.restore(args.src)
    except (ConfigError, CxrError) as exc:
        print(f"cxr-rag: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
