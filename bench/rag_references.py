"""References for the 14 NIH findings, before and after curated queries: precision@3 against a judged set.

    make bench-rag_references       # over the whole shared PubMedQA corpus (3,358 passages)

Data: ../shared/data/pubmedqa/corpus.jsonl, judged in tests/data/rag_references/judgements.tsv
(single annotator; method in the README beside it). The store is var/data/bench_chroma, the one
bench.rag_retrieval builds (ingestion is idempotent: a later run reuses it), with the BM25 index
built over it, searched in process.

- before: the client as it was: query "<finding> chest radiograph", hybrid (Chroma + BM25, RRF),
  the top 3 passages, each its own reference (two chunks of one PMID: two references);
- after: cxr_client.references as `cxr analyze` uses it: the curated clinical query, dense
  retrieval, chunks of one document merged, nothing below the relevance floor, top 3 documents.

precision@3 of a finding = judged-relevant references among its first 3 / 3 (a refused or missing
place counts as not relevant, an unjudged PMID as not relevant: both count against the method),
averaged over the 14 findings (before, a PMID listed twice counts twice, relevant or not). Also:
references cited, relevant ones among them, duplicate PMIDs within a finding and across one report
citing all 14 (before; after, a report lists a document once: `cxr analyze` names the further
findings in `also_for`, tests/unit/test_client_references.py). A floor sweep shows the trade-off.
Exits 1 when after < before or a finding lists a PMID twice. Writes bench/results/rag_references.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CXR_SHARED_DIR", ROOT.parent / "shared")) / "data" / "pubmedqa"
JUDGED = ROOT / "tests" / "data" / "rag_references" / "judgements.tsv"
NIH = (
    "Atelectasis Cardiomegaly Effusion Infiltration Mass Nodule Pneumonia Pneumothorax Consolidation Edema "
    "Emphysema Fibrosis Pleural_Thickening Hernia"
).split()
K = 3
FLOOR_SWEEP = (0.0, 0.35, 0.4, 0.45, 0.5, 0.55)


def load_judgements(path: Path = JUDGED) -> dict[str, dict[str, bool]]:
    out: dict[str, dict[str, bool]] = {}
    with path.open(encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            out.setdefault(row["finding"], {})[row["pmid"]] = row["relevant"] == "1"
    return out


def before_references(retriever, label: str) -> list[str]:
    """PMIDs of the references the client cited before: old query, hybrid, top 3 passages."""
    from cxr_rag.retrieval import Mode

    query = f"{label.replace('_', ' ')} chest radiograph"
    return [p.metadata["pmid"] for p in retriever.search(query, K, Mode.HYBRID).passages]


def after_references(retriever, label: str, floor: float) -> tuple[list[str], list[float], float]:
    """PMIDs (and similarities) `cxr analyze` cites for the finding now, and the best similarity seen."""
    from cxr_client.references import CANDIDATES_PER_REFERENCE, MAX_CANDIDATES, finding_query, select_references
    from cxr_rag.retrieval import Mode

    wanted = min(MAX_CANDIDATES, K * CANDIDATES_PER_REFERENCE)
    passages = retriever.search(finding_query(label), wanted, Mode.DENSE).passages
    chosen, best = select_references(passages, K, floor)
    return [h.key.removeprefix("PMID:") for h in chosen], [round(h.score, 3) for h in chosen], best or 0.0


def score(refs: dict[str, list[str]], judged: dict[str, dict[str, bool]]) -> dict:
    per: dict[str, dict] = {}
    for label, pmids in refs.items():
        rel = [judged[label].get(p) for p in pmids]
        per[label] = {
            "pmids": pmids,
            "precision_at_3": round(sum(bool(r) for r in rel[:K]) / K, 4),
            "cited": len(pmids),
            "relevant_cited": sum(bool(r) for r in rel),
            "unjudged": [p for p, r in zip(pmids, rel, strict=True) if r is None],
            "duplicate_pmids": sorted(p for p, n in Counter(pmids).items() if n > 1),
        }
    cited = sum(r["cited"] for r in per.values())
    relevant = sum(r["relevant_cited"] for r in per.values())
    return {
        "precision_at_3": round(sum(r["precision_at_3"] for r in per.values()) / len(per), 4),
        "references_cited": cited,
        "relevant_cited": relevant,
        "precision_of_cited": round(relevant / cited, 4) if cited else None,
        "findings_without_reference": sorted(k for k, r in per.items() if not r["cited"]),
        "unjudged_pmids": sum(len(r["unjudged"]) for r in per.values()),
        "findings": per,
    }


def main(argv: list[str] | None = None) -> int:
    from cxr_client.references import DEFAULT_REFERENCE_FLOOR

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=ROOT / "var" / "data" / "bench_chroma")
    ap.add_argument("--floor", type=float, default=DEFAULT_REFERENCE_FLOOR)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rag_references.json")
    args = ap.parse_args(argv)

    from cxr_rag.config import RagConfig
    from cxr_rag.ingest import read_documents
    from cxr_rag.runtime import RagRuntime

    cfg = RagConfig.model_validate({"vector_db_path": str(args.store), "documents_path": None})
    rt = RagRuntime(cfg)
    rt.open(progress=True, build_index=False)
    stats = rt.ingest(read_documents(DATA / "corpus.jsonl"), progress=True, rebuild=False)
    assert rt.retriever is not None and rt.store is not None
    rt.retriever.rebuild_index()
    judged = load_judgements()
    assert sorted(judged) == sorted(NIH), sorted(judged)

    before = {label: before_references(rt.retriever, label) for label in NIH}
    after, sims, best = {}, {}, {}
    for label in NIH:
        after[label], sims[label], best[label] = after_references(rt.retriever, label, args.floor)
    result = {
        "benchmark": "rag_references",
        "corpus_passages": stats.documents,
        "chunks": rt.store.count(),
        "judgements": str(JUDGED.relative_to(ROOT)),
        "judged_pairs": sum(len(v) for v in judged.values()),
        "judged_relevant": sum(sum(v.values()) for v in judged.values()),
        "floor": args.floor,
        "before": score(before, judged),
        "after": {
            **score(after, judged),
            "best_similarity": {k: round(v, 3) for k, v in best.items()},
            "similarities": sims,
        },
        "before_report_duplicate_pmids": sorted(
            p for p, n in Counter(p for v in before.values() for p in v).items() if n > 1
        ),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
    }
    sweep = {}
    for floor in FLOOR_SWEEP:
        s = score({label: after_references(rt.retriever, label, floor)[0] for label in NIH}, judged)
        sweep[str(floor)] = {k: s[k] for k in ("precision_at_3", "references_cited", "precision_of_cited")}
    result["after_floor_sweep"] = sweep  # judged on the same set: says how sensitive, not a tuned optimum
    result["after_duplicate_pmids_within_a_finding"] = sorted(
        p for v in after.values() for p, n in Counter(v).items() if n > 1
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'finding':<20}{'before P@3':>11}{'after P@3':>11}  after references (PMID)")
    for label in NIH:
        b, a = result["before"]["findings"][label], result["after"]["findings"][label]
        refs = a["pmids"] or "none above the floor"
        print(f"{label:<20}{b['precision_at_3']:>11.2f}{a['precision_at_3']:>11.2f}  {refs}")
    pb, pa = result["before"]["precision_at_3"], result["after"]["precision_at_3"]
    print(f"mean precision@3: before {pb:.3f}, after {pa:.3f} (floor {args.floor})")
    print(
        f"precision of the references cited: before {result['before']['precision_of_cited']}, after "
        f"{result['after']['precision_of_cited']}; after, by floor: {sweep}"
    )
    print(f"written to {args.out}")
    ok = pa >= pb and not result["after_duplicate_pmids_within_a_finding"]
    if not ok:
        print("FAILED: after < before, or a finding lists a PMID twice", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
