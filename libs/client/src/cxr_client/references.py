"""Literature references for classifier findings: a curated clinical query per finding, one
reference per document, and none below a relevance floor.

The NIH label alone ("Mass", "Hernia", "Edema") is a poor query: the word has other meanings
(body mass index, inguinal hernia, lymphedema) and "chest radiograph" pulls the same few papers
about radiography for every finding. Each of the 14 NIH findings therefore has a clinical
phrasing naming the condition and its usual synonyms; other labels fall back to their words.
Retrieval is dense, so a passage's score is its cosine similarity to the query, the quantity the
floor is stated in (a hybrid RRF score depends only on ranks: a top rank says nothing about
whether anything relevant exists). Chunks of one document (one PMID) merge into one reference.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# The 14 NIH ChestX-ray14 findings -> a clinical phrasing of the condition (not of the image).
FINDING_QUERIES: dict[str, str] = {
    "atelectasis": "atelectasis: collapse of part of the lung, lobar or segmental volume loss",
    "cardiomegaly": (
        "cardiomegaly: enlarged heart, increased cardiothoracic ratio, cardiac enlargement in heart failure "
        "or cardiomyopathy"
    ),
    "effusion": "pleural effusion: fluid in the pleural space, thoracentesis, chest tube drainage",
    "infiltration": (
        "pulmonary infiltrates: lung opacities from infection, inflammation or acute respiratory distress syndrome"
    ),
    "mass": "pulmonary mass: lung cancer, lung tumour or mediastinal mass",
    "nodule": "pulmonary nodule: solitary lung nodule, lung cancer screening",
    "pneumonia": "pneumonia: lung infection, community-acquired or ventilator-associated pneumonia",
    "pneumothorax": "pneumothorax: air in the pleural space, collapsed lung, chest tube",
    "consolidation": "lung consolidation: airspace opacity from pneumonia",
    "edema": "pulmonary edema: fluid in the lungs from heart failure or acute respiratory distress syndrome",
    "emphysema": "emphysema: chronic obstructive pulmonary disease, COPD, smoking-related lung destruction",
    "fibrosis": "pulmonary fibrosis: idiopathic pulmonary fibrosis, interstitial lung disease",
    "pleural_thickening": "pleural thickening: pleural plaques, asbestos exposure, fibrothorax",
    "hernia": ("hiatal hernia: stomach herniated through the diaphragm into the chest, paraesophageal hernia"),
}
# Cosine similarity (all-MiniLM-L6-v2) a passage needs to be cited; chosen in tests/data/rag_references/README.md.
DEFAULT_REFERENCE_FLOOR = 0.45
# Passages asked for per reference wanted: chunks of one document and cited documents are merged away.
CANDIDATES_PER_REFERENCE = 5
MAX_CANDIDATES = 50  # the rag service's default models.rag.max_top_k


def finding_query(label: str) -> str:
    """The curated query of an NIH finding; another label's own words, about the chest."""
    key = label.strip().lower().replace(" ", "_")
    return FINDING_QUERIES.get(key) or f"{label.replace('_', ' ')} in the chest"


def document_key(passage: Any) -> str:
    """One key per source document: its PMID when it has one, else its ingested document id."""
    meta = passage.metadata
    if meta.get("pmid"):
        return f"PMID:{meta['pmid']}"
    return str(meta.get("doc_id") or passage.source or passage.id)


@dataclass(frozen=True)
class DocumentHit:
    key: str
    passage: Any  # the document's best chunk (RetrievedPassage or cxr_rag Passage)
    score: float
    chunks: int


def merge_by_document(passages: Iterable[Any]) -> list[DocumentHit]:
    """One hit per document, scored by its best chunk, best first."""
    best: dict[str, Any] = {}
    count: dict[str, int] = {}
    for p in passages:
        key = document_key(p)
        count[key] = count.get(key, 0) + 1
        if key not in best or p.score > best[key].score:
            best[key] = p
    hits = [DocumentHit(k, p, float(p.score), count[k]) for k, p in best.items()]
    return sorted(hits, key=lambda h: (-h.score, h.key))


def select_references(passages: Sequence[Any], top_k: int, floor: float) -> tuple[list[DocumentHit], float | None]:
    """Up to `top_k` documents scoring at least `floor`, best first; and the best score seen."""
    hits = merge_by_document(passages)
    best = hits[0].score if hits else None
    return [h for h in hits if h.score >= floor][:top_k], best
