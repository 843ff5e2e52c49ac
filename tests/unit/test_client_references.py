"""`cxr analyze` references: the curated query of each NIH finding, one reference per document, the
relevance floor, and the judged set the bench scores them with (tests/data/rag_references)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict

from cxr_client.analyze import LiteratureReference
from cxr_client.references import FINDING_QUERIES, finding_query, merge_by_document, select_references
from cxr_client.report import to_html, to_markdown
from cxr_protos.rag.v1 import rag_service_pb2 as pb
from tests.support.paths import PUBMEDQA, REPO
from tests.support.reports import report

NIH = (
    "Atelectasis Cardiomegaly Effusion Infiltration Mass Nodule Pneumonia Pneumothorax Consolidation Edema "
    "Emphysema Fibrosis Pleural_Thickening Hernia"
).split()
JUDGED = REPO / "tests" / "data" / "rag_references"


def corpus_by_pmid() -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for line in (PUBMEDQA / "corpus.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        out[rec["pmid"]].append(rec)
    return out


def passage(rec: dict, score: float) -> pb.RetrievedPassage:
    """A passage as the rag service returns it for a record of the shared corpus."""
    meta = {"pmid": rec["pmid"], "doc_id": rec["id"], "section": rec["section"]}
    return pb.RetrievedPassage(
        id=f"chunk-{rec['id']}", text=rec["text"], source=f"PMID:{rec['pmid']}", score=score, metadata=meta
    )


def test_every_nih_finding_has_a_curated_query():
    for label in NIH:
        q = finding_query(label)
        assert q == FINDING_QUERIES[label.lower()] and "chest radiograph" not in q, label
    assert finding_query("Mass") == "pulmonary mass: lung cancer, lung tumour or mediastinal mass"
    assert finding_query("pleural thickening") == finding_query("Pleural_Thickening")
    assert finding_query("Lung_Lesion") == "Lung Lesion in the chest"  # a label outside the 14: its own words


def test_chunks_of_one_document_are_one_reference_and_the_floor_refuses():
    docs = corpus_by_pmid()
    two = next(pm for pm, recs in docs.items() if len(recs) >= 3)  # an abstract of several passages
    other = next(pm for pm in docs if pm != two)
    passages = [
        passage(docs[two][0], 0.61),
        passage(docs[other][0], 0.58),
        passage(docs[two][1], 0.66),
        passage(docs[two][2], 0.40),
        passage(docs[other][1], 0.30),
    ]
    hits = merge_by_document(passages)
    assert [(h.key, h.chunks, h.score) for h in hits] == [(f"PMID:{two}", 3, 0.66), (f"PMID:{other}", 2, 0.58)]
    assert hits[0].passage.id == f"chunk-{docs[two][1]['id']}"  # the best chunk stands for its document
    chosen, best = select_references(passages, 3, 0.6)
    assert [h.key for h in chosen] == [f"PMID:{two}"] and best == 0.66
    chosen, best = select_references(passages, 3, 0.7)
    assert chosen == [] and best == 0.66  # nothing above the floor: no reference, not the best of the junk
    assert select_references([], 3, 0.1) == ([], None)


def test_report_says_when_a_finding_has_no_reference_and_names_every_finding_of_a_shared_one():
    ref = LiteratureReference(
        number=1,
        finding="Mass",
        title="",
        source="PMID:11888773",
        passage_id="p",
        score=0.6,
        excerpt="x",
        also_for=["Nodule"],
    )
    notes = {"Atelectasis": "no reference above the relevance floor 0.45 (best similarity 0.41)"}
    r = report(literature=[ref], literature_notes=notes)
    md = to_markdown(r)
    assert "[1] **PMID:11888773** — for *Mass*, *Nodule*: x" in md
    assert "*Atelectasis*: no reference above the relevance floor 0.45 (best similarity 0.41)." in md
    page = to_html(r)
    assert "<i>Mass</i>, <i>Nodule</i>" in page and "no reference above the relevance floor 0.45" in page
    md = to_markdown(report(literature=[], literature_notes=notes))
    assert "No literature retrieved" not in md and "*Atelectasis*: no reference above" in md


def test_judged_set_covers_the_14_findings_with_passages_of_the_shared_corpus():
    docs = corpus_by_pmid()
    rows = list(csv.DictReader((JUDGED / "judgements.tsv").open(encoding="utf-8"), delimiter="\t"))
    by_finding: dict[str, dict[str, str]] = defaultdict(dict)
    for row in rows:
        assert row["pmid"] in docs, row
        assert row["relevant"] in ("0", "1") and row["note"].strip(), row
        assert row["pmid"] not in by_finding[row["finding"]], row  # judged once per finding
        by_finding[row["finding"]][row["pmid"]] = row["relevant"]
    assert sorted(by_finding) == sorted(NIH)
    for label, judged in by_finding.items():
        assert list(judged.values()).count("0") >= 3, label
    readme = (JUDGED / "README.md").read_text(encoding="utf-8")
    assert "single annotator" in readme and "judgements.tsv" in readme
