"""A literature-scale distractor corpus around the PubMedQA gold passages, reproducible from a seed.

    .venv/bin/python -m bench.rag_corpus                  # 1,000,000 passages -> var/data/rag_corpus/
    .venv/bin/python -m bench.rag_corpus -n 200000 --seed 7

Method (also written to README.md beside the output):
- gold: every passage of the 800 evaluation questions (qrels.tsv of ../shared/data/pubmedqa),
  written once each, first, unchanged (same id, so qrels.tsv applies as it is);
- material: the sentences of every other corpus passage (the 200 held-out items), minus any sentence
  whose normalised text also occurs in a gold passage, so no gold sentence reaches a distractor;
- each distractor: a sentence count drawn from the material passages' own counts, then that many
  sentences, each from a different material passage drawn at random (sentence-level recombination
  across passages), joined in the drawn order; ids `dx-<n>`, source `rag_corpus distractor`;
- one `random.Random(seed)` draws everything, so (inputs, N, seed) fixes every byte of the output, and
  the corpus for a smaller N is the first lines of the one for a larger N (same seed).
Because the held-out items' sentences are distractor material, this corpus must not be used to
evaluate those 200 held-out questions.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CXR_SHARED_DIR", ROOT.parent / "shared")) / "data" / "pubmedqa"
OUT_DIR = ROOT / "var" / "data" / "rag_corpus"
DEFAULT_N = 1_000_000
DEFAULT_SEED = 20250125
DISTRACTOR_SOURCE = "rag_corpus distractor"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


def sentences(text: str) -> list[str]:
    """Sentences of an abstract paragraph: split after . ! ? followed by space and a capital, digit or bracket."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def normalise(sentence: str) -> str:
    return " ".join(sentence.lower().split())


@dataclass(frozen=True)
class Sources:
    gold: list[dict]  # corpus records of the evaluation questions' passages, in corpus order
    material: list[list[str]]  # sentences of each non-gold passage (gold sentences removed)
    counts: list[int]  # sentences per non-gold passage, as in the source

    @property
    def gold_sentences(self) -> set[str]:
        return {normalise(s) for rec in self.gold for s in sentences(rec["text"])}


def eval_gold_ids(data: Path = DATA) -> set[str]:
    """Passage ids relevant to the 800 evaluation questions (questions.jsonl x qrels.tsv)."""
    qids = {json.loads(ln)["qid"] for ln in (data / "questions.jsonl").read_text(encoding="utf-8").splitlines()}
    with (data / "qrels.tsv").open(encoding="utf-8") as f:
        return {r["passage_id"] for r in csv.DictReader(f, delimiter="\t") if r["qid"] in qids and int(r["relevance"])}


def load_sources(data: Path = DATA) -> Sources:
    gold_ids = eval_gold_ids(data)
    records = [json.loads(ln) for ln in (data / "corpus.jsonl").read_text(encoding="utf-8").splitlines() if ln]
    gold = [r for r in records if r["id"] in gold_ids]
    banned = {normalise(s) for r in gold for s in sentences(r["text"])}
    material, counts = [], []
    for r in records:
        if r["id"] in gold_ids:
            continue
        sents = sentences(r["text"])
        kept = [s for s in sents if normalise(s) not in banned]
        if kept:
            material.append(kept)
            counts.append(len(sents))
    if len(material) < 2:
        raise SystemExit(f"{data}: fewer than 2 non-gold passages, nothing to recombine")
    return Sources(gold, material, counts)


def distractors(src: Sources, n: int, seed: int) -> Iterator[dict]:
    """`n` recombined passages: each sentence from a different material passage, all drawn by `seed`."""
    rng = random.Random(seed)
    pool = range(len(src.material))
    for i in range(n):
        k = min(rng.choice(src.counts), len(src.material))
        picked = rng.sample(pool, k)
        text = " ".join(rng.choice(src.material[p]) for p in picked)
        yield {"id": f"dx-{i:07d}", "pmid": "", "title": "", "section": "", "text": text, "source": DISTRACTOR_SOURCE}


def output_path(n: int, seed: int, out_dir: Path = OUT_DIR) -> Path:
    return out_dir / f"corpus-{n}-seed{seed}.jsonl"


def write_corpus(n: int, seed: int, out: Path, *, data: Path = DATA, progress: bool = True) -> dict:
    """Write gold passages then distractors up to `n` lines (streamed; a partial file is renamed only at the end)."""
    src = load_sources(data)
    if n < len(src.gold):
        raise SystemExit(f"N={n} is smaller than the {len(src.gold)} gold passages it must contain")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    started = time.perf_counter()
    digest = hashlib.sha256()
    with tmp.open("w", encoding="utf-8") as f, tqdm(total=n, unit="passage", disable=not progress) as bar:
        lines = 0
        for rec in src.gold:
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            f.write(line)
            digest.update(line.encode())
            lines += 1
        bar.update(lines)
        for rec in distractors(src, n - len(src.gold), seed):
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            f.write(line)
            digest.update(line.encode())
            lines += 1
            if lines % 10_000 == 0:
                bar.update(lines - bar.n)
        bar.update(lines - bar.n)
    tmp.replace(out)
    manifest = {
        "file": out.name,
        "passages": n,
        "gold_passages": len(src.gold),
        "distractors": n - len(src.gold),
        "seed": seed,
        "material_passages": len(src.material),
        "material_sentences": sum(len(m) for m in src.material),
        "sha256": digest.hexdigest(),
        "seconds": round(time.perf_counter() - started, 1),
        "source": str(data),
    }
    out.with_suffix(".manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (out.parent / "README.md").write_text(_readme(), encoding="utf-8")
    return manifest


def _readme() -> str:
    doc = (__doc__ or "").split("Method (also written to README.md beside the output):\n", 1)[-1]
    return (
        "# RAG scale corpus (generated by bench/rag_corpus.py; not in git)\n\n"
        "Built from ../shared/data/pubmedqa (PubMedQA, Jin et al. 2019, MIT licence; the texts are PubMed\n"
        "abstracts). `corpus-<N>-seed<S>.jsonl` has one passage a line: gold passages as in corpus.jsonl,\n"
        "distractors with id, pmid (empty), title, section, text and source;\n"
        "`corpus-<N>-seed<S>.manifest.json` records the counts, seed and the file's sha256.\n\n## Method\n" + doc
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--passages", type=int, default=DEFAULT_N, help="passages in all, gold included")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--out", type=Path, help="output .jsonl (default var/data/rag_corpus/corpus-<N>-seed<S>.jsonl)")
    args = ap.parse_args(argv)
    out = args.out or output_path(args.passages, args.seed)
    manifest = write_corpus(args.passages, args.seed, out)
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
