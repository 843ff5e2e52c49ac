"""The embedder's start from a warm cache on real components: the OpenVINO export checked against the torch
vectors stored with it, without importing torch, transformers or sentence-transformers (RagRuntime.open in a
fresh interpreter, and the service process answering over gRPC); a damaged or forged
reference is a miss that torch recomputes; another model or check text set is another cache entry; and the
tokenizer.json path gives sentence-transformers' input ids on real PubMedQA passages."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from cxr_protos.rag.v1 import rag_service_pb2 as pb
from cxr_protos.rag.v1 import rag_service_pb2_grpc as pb_grpc
from cxr_rag import embedding_runtime, embeddings
from cxr_rag.config import EmbeddingRuntimeConfig
from cxr_rag.embedding_runtime import CHECK_TEXTS, tokenize_batch
from cxr_rag.embeddings import Embedder, default_model_path
from cxr_serving.runtimes.backends import openvino_cpu_capabilities
from cxr_serving.runtimes.prepare import META
from tests.support.paths import PUBMEDQA, REPO
from tests.support.rag import subset_corpus
from tests.support.servers import auth
from tests.support.service_process import service_process

# Names this change adds are read from the modules at call time, so the file imports without it too.
HEAVY = ("torch", "transformers", "sentence_transformers")

# One start of the service's runtime in a fresh interpreter: both embedder roles, a query and an ingest encode.
START = """
import json, sys
from pathlib import Path
import numpy as np
from cxr_rag.embeddings import _cuda_driver_loads
from cxr_rag.runtime import RagRuntime
from tests.support.rag import rag_cfg

cache, db, out = (Path(a) for a in sys.argv[1:4])
texts = json.loads(Path(sys.argv[4]).read_text())
runtime = {"backend": "openvino", "precision": sys.argv[5], "cache_dir": str(cache)}
device = "cpu" if _cuda_driver_loads() else "auto"  # auto resolves without torch only where no driver loads
rt = RagRuntime(rag_cfg(db, embedding_runtime=runtime, embedding_device=device))
rt.open(progress=False)
query, ingest = rt.embedder, rt.ingest_embedder
np.save(out / "query.npy", query.encode(texts))
np.save(out / "ingest.npy", ingest.encode(texts))
print("START " + json.dumps({
    "heavy": [m for m in sys.argv[6].split(",") if m in sys.modules],
    "query": query.status(), "ingest": ingest.status(), "exported": query.exported,
    "check": query.check.numbers if query.check else None, "dimension": query.dimension,
    "max_seq_length": query.max_seq_length, "count": rt.store.count(),
}))
"""


def precision() -> str:
    return "bfloat16" if "BF16" in openvino_cpu_capabilities() else "float32"


def runtime_cfg(cache: Path) -> EmbeddingRuntimeConfig:
    return EmbeddingRuntimeConfig(backend="openvino", precision=precision(), cache_dir=cache)


def passages(n: int) -> list[str]:
    lines = (PUBMEDQA / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(ln)["text"] for ln in lines]


def abstracts(n: int) -> list[str]:
    """Whole abstracts (every section of a pmid joined): most are longer than the model's 256 tokens."""
    by_pmid: dict[str, list[str]] = {}
    for ln in (PUBMEDQA / "corpus.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(ln)
        by_pmid.setdefault(row["pmid"], []).append(row["text"])
    return [" ".join(parts) for parts in list(by_pmid.values())[:n]]


def start(cache: Path, work: Path, texts: list[str]) -> dict:
    work.mkdir(parents=True)
    (work / "texts.json").write_text(json.dumps(texts))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("CXR_CONFIG_PATH", None)
    args = [str(cache), str(work / "db"), str(work), str(work / "texts.json"), precision(), ",".join(HEAVY)]
    run = subprocess.run(
        [sys.executable, "-c", START, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600
    )
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("START ")), None)
    assert run.returncode == 0 and line is not None, run.stdout[-3000:] + run.stderr[-3000:]
    return {**json.loads(line.removeprefix("START ")), "vectors": work}


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A cache made by one cold start (export + torch reference) and what that start served."""
    root = tmp_path_factory.mktemp("embedder-start")
    cold = start(root / "cache", root / "cold", passages(24))
    return root / "cache", cold


def opened(cfg: EmbeddingRuntimeConfig, cache: Path, model: Path) -> embedding_runtime.FastOutcome | None:
    """The torch-free start path alone: the checked export, or None (a miss or a failed check)."""
    digest = embedding_runtime.model_files_digest(model)
    return embedding_runtime.open_checked_export(cfg, cache, digest, embeddings.fast_tokenizer(model, 256), 2)


def entry(cache: Path) -> Path:
    (folder,) = [p for p in (cache / embedding_runtime.MODEL_LABEL).iterdir() if (p / META).is_file()]
    return folder


def test_a_warm_start_of_the_rag_runtime_imports_no_torch_and_serves_the_same_vectors(warm, tmp_path):
    cache, cold = warm
    assert cold["exported"] and set(cold["heavy"]) == set(HEAVY)  # the cold start needed torch: the export
    again = start(cache, tmp_path / "warm", passages(24))
    assert again["heavy"] == [], f"a warm start imported {again['heavy']}"
    assert (entry(cache) / embedding_runtime.REFERENCE).is_file()
    assert not again["exported"] and again["query"]["backend"] == "openvino" == again["ingest"]["backend"]
    assert (again["query"]["hint"], again["ingest"]["hint"]) == ("latency", "throughput")  # both roles
    assert again["query"]["note"].startswith("agreement check passed: min_cosine=")  # the check still ran
    assert again["check"]["min_cosine"] >= 0.99 and (again["dimension"], again["max_seq_length"]) == (384, 256)
    for role in ("query", "ingest"):
        first = np.load(cold["vectors"] / f"{role}.npy")
        second = np.load(again["vectors"] / f"{role}.npy")
        assert first.shape == second.shape == (24, 384)
        assert float((first * second).sum(axis=1).min()) >= 0.9999


@pytest.mark.timeout(300)
def test_the_rag_service_started_from_a_warm_cache_answers_without_torch_in_the_process(warm, tmp_path):
    """The service process itself (`python -m cxr_rag`): SERVING, an extractive answer, and no libtorch mapped."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(subset_corpus().read_text().splitlines()[:12]) + "\n")
    rag = {"vector_db_path": str(tmp_path / "db"), "documents_path": str(corpus), "llm": {"mode": "extractive"}}
    rag["embedding_device"] = "cpu"  # on a host with a CUDA driver, auto asks torch (and torch serves on the GPU)
    rag["embedding_runtime"] = {"backend": "openvino", "precision": precision(), "cache_dir": str(warm[0])}
    cfg = {"models": {"rag": rag}, "monitoring": {"log_json": False}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    args = ("--config", str(tmp_path / "cfg.json"))
    env = {"HF_HUB_OFFLINE": "1"}
    with service_process(tmp_path, "cxr_rag", "rag", env, args, wait_serving=False) as sp:
        sp.wait_health(timeout=240)
        with grpc.insecure_channel(sp.target) as ch:
            question = "Does the helicopter environment impair intubation by flight nurses?"
            r = pb_grpc.RagServiceStub(ch).AnswerQuestion(
                pb.AnswerQuestionRequest(question=question), metadata=auth(), timeout=60
            )
            assert r.extractive and r.citations[0].source == "PMID:10135926"
        maps = Path(f"/proc/{sp.proc.pid}/maps").read_text()
        assert "libtorch" not in maps, "the warm service process loaded torch"
        sp.signal(signal.SIGTERM)
        assert sp.wait_exit(timeout=60) == 0
        assert "agreement with the torch reference stored with it on 36 held texts" in sp.logs()


def _forged(raw: bytes) -> bytes:
    """Valid JSON and digest, but vectors that are not torch's (random unit vectors): the check must fail."""
    record = json.loads(raw)
    rows, dim = record["shape"]
    fake = np.random.default_rng(0).normal(size=(rows, dim)).astype("<f4")
    fake = np.ascontiguousarray(fake / np.linalg.norm(fake, axis=1, keepdims=True))
    record["vectors"] = base64.b64encode(fake.tobytes()).decode()
    record["sha256"] = hashlib.sha256(fake.tobytes()).hexdigest()
    return json.dumps(record).encode()


def _flipped(raw: bytes) -> bytes:
    record = json.loads(raw)
    vec = bytearray(base64.b64decode(record["vectors"]))
    vec[100] ^= 0x40  # one bit of one float
    record["vectors"] = base64.b64encode(bytes(vec)).decode()
    return json.dumps(record).encode()


DAMAGE = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "empty": lambda raw: b"",
    "one_bit_flipped": _flipped,
    "other_check_texts": lambda raw: raw.replace(json.loads(raw)["check_texts"].encode(), b"0" * 64),
    "forged_vectors": _forged,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_reference_is_a_miss_that_torch_recomputes(warm, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    shutil.copytree(warm[0], cache)
    folder = entry(cache)
    good = embedding_runtime.load_reference(folder)
    assert good is not None
    raw = (folder / embedding_runtime.REFERENCE).read_bytes()
    (folder / embedding_runtime.REFERENCE).write_bytes(DAMAGE[damage](raw))
    model, cfg = default_model_path(), runtime_cfg(cache)
    with caplog.at_level(logging.INFO, logger="cxr_rag.embedding_runtime"):
        assert embedding_runtime.load_reference(folder) is None or damage == "forged_vectors"
        assert opened(cfg, cache, model) is None  # never a pass
        emb = Embedder(model, "cpu", cfg)
    assert emb.backend == "openvino" and not emb.exported and emb.cache_path == folder
    assert emb.check is not None and emb.check.numbers["min_cosine"] >= 0.99  # checked against live torch
    assert any("agreement with torch on 36 held texts" in r.getMessage() for r in caplog.records)
    rewritten = embedding_runtime.load_reference(folder)
    assert rewritten is not None and np.allclose(rewritten, good, atol=1e-5)
    assert opened(cfg, cache, model) is not None  # the next start is warm again


def test_a_reference_that_cannot_be_written_leaves_the_checked_export_serving(warm, tmp_path, caplog, monkeypatch):
    """A cache the service cannot write (stood in for by a store that raises: the tests run as root, which no
    file mode stops) still serves a cached export that passes its live check against torch."""
    cache = tmp_path / "cache"
    shutil.copytree(warm[0], cache)
    folder = entry(cache)
    (folder / embedding_runtime.REFERENCE).unlink()

    def refuse(folder: Path, vectors: np.ndarray) -> None:
        raise PermissionError(13, "Permission denied", str(folder / embedding_runtime.REFERENCE))

    monkeypatch.setattr(embedding_runtime, "store_reference", refuse)
    model, cfg = default_model_path(), runtime_cfg(cache)
    with caplog.at_level(logging.INFO, logger="cxr_rag.embedding_runtime"):
        emb = Embedder(model, "cpu", cfg)
    assert emb.backend == "openvino" and emb.check is not None and emb.check.numbers["min_cosine"] >= 0.99
    assert "torch serves" not in emb.runtime_note, emb.runtime_note
    assert any("torch reference not stored" in r.getMessage() for r in caplog.records)
    assert not (folder / embedding_runtime.REFERENCE).exists()


def test_another_model_file_or_check_text_set_is_another_cache_entry(warm, tmp_path, monkeypatch):
    cache, _ = warm
    model, cfg = default_model_path(), runtime_cfg(cache)
    digest = embedding_runtime.model_files_digest(model)
    folder = embedding_runtime.cache_folder(cfg, cache, digest, 256)
    assert folder == entry(cache)
    same = tmp_path / "same"  # the same files elsewhere: the same entry (content, not path)
    same.mkdir()
    for f in model.iterdir():
        (same / f.name).symlink_to(f)
    assert embedding_runtime.model_files_digest(same) == digest
    for name in ("config.json", "tokenizer.json", "modules.json"):
        changed = tmp_path / f"changed-{name}"
        shutil.copytree(same, changed, symlinks=True)
        (changed / name).unlink()
        (changed / name).write_bytes((model / name).read_bytes() + b"\n")
        assert embedding_runtime.model_files_digest(changed) != digest, name
        assert opened(cfg, cache, changed) is None  # no stale reuse
    assert embedding_runtime.cache_folder(cfg, cache, digest, 128) != folder
    other_texts = [*CHECK_TEXTS[:-1], CHECK_TEXTS[-1] + " Lateral view."]
    assert embedding_runtime.cache_folder(cfg, cache, digest, 256, other_texts) != folder
    monkeypatch.setattr(embedding_runtime, "CHECK_TEXTS", other_texts)
    assert opened(cfg, cache, model) is None
    monkeypatch.undo()
    assert opened(cfg, cache, model) is not None


def test_tokenizer_json_gives_sentence_transformers_input_ids_on_pubmedqa():
    from sentence_transformers import SentenceTransformer

    model = default_model_path()
    st = SentenceTransformer(str(model), device="cpu", local_files_only=True)
    assert st.max_seq_length == 256
    tok = embeddings.fast_tokenizer(model, st.max_seq_length)
    questions = [json.loads(ln)["question"] for ln in (PUBMEDQA / "questions.jsonl").read_text().splitlines()]
    long = abstracts(120)
    untruncated = embeddings.fast_tokenizer(model, 100_000)
    over = sum(len(untruncated.encode(t).ids) > 256 for t in long)
    assert over >= 30, over  # truncation at max_seq_length is exercised
    texts = passages(400) + questions[:200] + long
    for s in range(0, len(texts), 16):  # batches of mixed lengths: padding too
        batch = texts[s : s + 16]
        ids, mask = tokenize_batch(tok, batch)
        want = st.tokenize(batch)
        assert np.array_equal(ids, want["input_ids"].numpy()), batch
        assert np.array_equal(mask, want["attention_mask"].numpy()), batch
