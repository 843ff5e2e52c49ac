"""The embedder's fast CPU path: MiniLM exported once to OpenVINO or ONNX Runtime, kept only if it agrees
with torch (cosine >= min_cosine on held texts), else torch serves and the reason is logged and shown.

The export is cached like the model runtimes' (cxr_serving.runtimes): keyed by the model files' digest, the
backend, precision, export recipe, check texts and library versions, written into a temporary folder and renamed.
Torch's vectors of the check texts are kept in the same entry, so a later start checks the export against them
without importing torch (services/rag/README.md).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_rag.config import EmbeddingRuntimeConfig
from cxr_serving.metrics import RUNTIME_CHECK, RUNTIME_EXPORTS, RUNTIME_FALLBACK
from cxr_serving.runtimes.backends import BACKENDS, BackendUnavailable
from cxr_serving.runtimes.check import CheckResult
from cxr_serving.runtimes.prepare import META, export_once, replace_file

log = logging.getLogger(__name__)

MODEL_LABEL = "rag-embedder"  # the `model` label of the cxr_model_runtime_* metrics
RECIPE = "1: onnx opset 17, mean pooling and L2 norm in the graph; int8: NNCF transformer on CALIBRATION_TEXTS"
INPUTS = ("input_ids", "attention_mask")
CHECK_BATCH = 8
REFERENCE = "torch_reference.json"  # torch's vectors of CHECK_TEXTS, beside the export in its cache entry
REFERENCE_RECIPE = "1: sentence-transformers encode, batches of CHECK_BATCH, L2-normalised float32"

Batch = tuple[np.ndarray, np.ndarray]  # ids, mask (int64, B x T)
Encode = Callable[[Sequence[Batch]], list[np.ndarray]]  # batches -> one B x D array of unit vectors per batch

_FINDINGS = (
    "pleural effusion",
    "pneumothorax",
    "cardiomegaly",
    "pulmonary nodule",
    "consolidation",
    "atelectasis",
    "pulmonary edema",
    "hiatal hernia",
    "emphysema",
    "interstitial fibrosis",
    "pleural thickening",
    "lung mass",
)

_SENTENCES = (
    "We retrospectively reviewed {n} consecutive chest radiographs reporting {f}.",
    "The sensitivity of portable radiography for {f} was lower than that of computed tomography.",
    "Patients with {f} had a longer hospital stay (median {n} days, interquartile range 3 to 12).",
    "Interobserver agreement for {f} between two thoracic radiologists was moderate (kappa 0.{n}).",
    "A deep learning model detected {f} with an area under the curve of 0.9{n}.",
    "Follow-up imaging after {n} weeks showed resolution of the {f} in most cases.",
    "Is {f} on the admission chest film associated with mortality in the intensive care unit?",
    "Lateral decubitus views improved the detection of small {f}.",
)


def _held_texts() -> tuple[list[str], list[str]]:
    """Check texts (short questions to 256-token paragraphs, so truncation is checked too) and separate
    calibration texts; written here so the check never depends on a data directory."""
    check: list[str] = []
    for i, f in enumerate(_FINDINGS):
        check.append(f"{f}?" if i % 2 else f"What does {f} look like on a chest radiograph?")
        sentences = [s.format(f=f, n=7 + 3 * j) for j, s in enumerate(_SENTENCES)]
        check.append(" ".join(sentences[: 2 + i % 5]))
        check.append(" ".join(sentences * (1 + i % 3)))
    calibration = [
        " ".join(s.format(f=f, n=11 + k) for k, s in enumerate(reversed(_SENTENCES[: 3 + i % 5])))
        for i, f in enumerate(reversed(_FINDINGS))
    ]
    return check, calibration


CHECK_TEXTS, CALIBRATION_TEXTS = _held_texts()


def texts_digest(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


@dataclass
class FastOutcome:
    """What serves the embedder: `encode` (None: torch), its backend and precision, and the visible note."""

    backend: str = "torch"
    precision: str = "float32"
    encode: Encode | None = None
    # another encode over the same loaded artefact (own requests); True: compiled for throughput (ingestion)
    new_encode: Callable[[bool], Encode] | None = None
    note: str = ""
    check: CheckResult | None = None
    exported: bool = False
    cache_path: Path | None = None
    dimension: int = 0  # set when torch was not loaded: the stored reference's width


class _Pooled:
    """Transformer + mean pooling over the mask + L2 norm: what sentence-transformers computes for MiniLM."""

    @staticmethod
    def build(transformer: Any) -> Any:
        import torch

        class Pooled(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.transformer = transformer

            def forward(self, input_ids: Any, attention_mask: Any) -> Any:
                hidden = self.transformer(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    token_type_ids=torch.zeros_like(input_ids),
                ).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

        return Pooled().eval()


def tokenize_batch(tokenizer: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Padded int64 ids and mask of `texts` (the tokenizer truncates to the model's max_seq_length)."""
    enc = tokenizer.encode_batch(texts)
    ids = np.asarray([e.ids for e in enc], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in enc], dtype=np.int64)
    return ids, mask


def _export_onnx(transformer: Any, path: Path) -> None:
    import torch

    example = torch.ones(2, 8, dtype=torch.long)
    dynamic = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}}
    with torch.inference_mode():
        torch.onnx.export(
            _Pooled.build(transformer),
            (example, example),
            str(path),
            input_names=list(INPUTS),
            output_names=["embedding"],
            dynamic_axes={**dynamic, "embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def _export(backend: str, precision: str, transformer: Any, tokenizer: Any, folder: Path) -> None:
    onnx_path = folder / "model.onnx"
    _export_onnx(transformer, onnx_path)
    if backend == "onnxruntime" and precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(onnx_path), str(folder / "model.int8.onnx"), weight_type=QuantType.QInt8)
        onnx_path.unlink()
    elif backend == "openvino":
        import openvino as ov

        model = ov.convert_model(str(onnx_path))
        if precision == "int8":
            import nncf

            items = []
            for s in range(0, len(CALIBRATION_TEXTS), 4):
                ids, mask = tokenize_batch(tokenizer, CALIBRATION_TEXTS[s : s + 4])
                items.append({"input_ids": ids, "attention_mask": mask})
            model = nncf.quantize(
                model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items)
            )
        ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=False)
        onnx_path.unlink()


def _load(backend: str, precision: str, folder: Path, threads: int) -> Callable[[bool], Encode]:
    """The artefact read once; each call of the result is an encode of its own (OpenVINO: its own compiled
    model, as one compiled under the latency hint runs one request at a time and would queue a query behind an
    ingest batch), so two embedder roles never wait for each other's call. `throughput=True` (ingestion only)
    compiles under the throughput hint: its streams run several batches of one call at once, while a query's
    encode stays on the latency hint, one batch on every thread."""
    if backend == "openvino":
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(folder / "model.xml"))

        def ov_encoder(throughput: bool = False) -> Encode:
            config: dict[str, Any] = {
                "PERFORMANCE_HINT": "THROUGHPUT" if throughput else "LATENCY",
                "INFERENCE_NUM_THREADS": threads,
            }
            if precision != "int8":
                config["INFERENCE_PRECISION_HINT"] = "bf16" if precision == "bfloat16" else "f32"
            compiled = core.compile_model(model, "CPU", config)
            if not throughput:
                request = compiled.create_infer_request()  # the Embedder's encode lock serialises its use

                def ov_encode(batches: Sequence[Batch]) -> list[np.ndarray]:
                    return [
                        np.array(request.infer({"input_ids": i, "attention_mask": m})[0], dtype=np.float32, copy=True)
                        for i, m in batches
                    ]

                return ov_encode
            jobs = ov.AsyncInferQueue(compiled, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))

            def ov_encode_many(batches: Sequence[Batch]) -> list[np.ndarray]:
                out: list[np.ndarray] = [np.empty(0, np.float32)] * len(batches)

                def done(request: Any, k: int) -> None:
                    out[k] = np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)

                jobs.set_callback(done)
                for k, (i, m) in enumerate(batches):
                    jobs.start_async({"input_ids": i, "attention_mask": m}, k)
                jobs.wait_all()
                return out

            return ov_encode_many

        return ov_encoder
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    name = "model.int8.onnx" if precision == "int8" else "model.onnx"
    session = ort.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])

    def ort_encode(batches: Sequence[Batch]) -> list[np.ndarray]:
        return [
            np.asarray(session.run(None, {"input_ids": i, "attention_mask": m})[0], dtype=np.float32)
            for i, m in batches
        ]

    def ort_encoder(throughput: bool = False) -> Encode:
        return ort_encode  # an InferenceSession runs concurrent calls, each on every thread

    return ort_encoder


def model_files_digest(model_path: Path) -> str:
    """SHA-256 of every file of the model directory (names and contents; hidden ones aside): what the weights,
    config and tokenizer an export and its torch reference were made from, readable without loading torch."""
    files = [Path(d, n) for d, _, names in os.walk(model_path, followlinks=True) for n in names]
    h = hashlib.sha256()
    for file in sorted(files):  # symlinks followed: a hub cache's snapshot is links to its blobs
        rel = file.relative_to(model_path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        with file.open("rb") as f:
            h.update(str(rel).encode() + b"\0" + hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def runtime_versions(cfg: EmbeddingRuntimeConfig) -> dict[str, str]:
    """The libraries the export and its torch reference depend on, read from package metadata (no torch import)."""
    dists = ["torch", "transformers", "sentence-transformers", "tokenizers"]
    if cfg.backend == "openvino":
        dists += ["openvino", "nncf"] if cfg.precision == "int8" else ["openvino"]
    elif cfg.backend == "onnxruntime":
        dists += ["onnxruntime", "onnx"]
    return {d: _version(d) for d in dists}


def cache_folder(
    cfg: EmbeddingRuntimeConfig,
    cache_dir: Path,
    model_digest: str,
    max_seq_length: int,
    check_texts: Sequence[str] | None = None,
) -> Path:
    """The cache entry of the export and of torch's vectors of `check_texts` (default CHECK_TEXTS)."""
    parts = {
        "model_files": model_digest,
        "backend": cfg.backend,
        "precision": cfg.precision,
        "max_seq_length": max_seq_length,
        "versions": runtime_versions(cfg),
        "recipe": RECIPE,
        "reference_recipe": REFERENCE_RECIPE,
        "check_texts": texts_digest(CHECK_TEXTS if check_texts is None else check_texts),
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir / MODEL_LABEL / key


def store_reference(folder: Path, vectors: np.ndarray) -> None:
    """Torch's check vectors into the cache entry, replaced atomically, with a checksum of their bytes (it finds
    damage, not forgery: whoever can write the entry can write the export too, so the cache must be writable by
    the service's user only)."""
    data = np.ascontiguousarray(vectors, dtype="<f4")
    record = {
        "format": 1,
        "check_texts": texts_digest(CHECK_TEXTS),
        "shape": list(data.shape),
        "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
        "vectors": base64.b64encode(data.tobytes()).decode(),
    }
    replace_file(folder / REFERENCE, json.dumps(record).encode())


def load_reference(folder: Path) -> np.ndarray | None:
    """The stored torch vectors of CHECK_TEXTS; None when absent, or damaged in any way (a miss, never a pass)."""
    path = folder / REFERENCE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_bytes())
        raw = base64.b64decode(record["vectors"], validate=True)
        if record["format"] != 1 or record["check_texts"] != texts_digest(CHECK_TEXTS):
            raise ValueError("made for other check texts")
        if hashlib.sha256(raw).hexdigest() != record["sha256"]:
            raise ValueError("checksum mismatch")
        rows, dim = (int(n) for n in record["shape"])
        vectors = np.frombuffer(raw, dtype="<f4").reshape(rows, dim).astype(np.float32)
        if rows != len(CHECK_TEXTS) or not np.isfinite(vectors).all():
            raise ValueError(f"{rows} rows for {len(CHECK_TEXTS)} texts, or non-finite")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("embedder: torch reference %s is damaged (%s): recomputed with torch", path, exc)
        return None
    return vectors


def cpu_threads() -> int:
    """The threads the runtime computes on: OMP_NUM_THREADS (else MKL_NUM_THREADS) when set, else the CPUs this
    process may use (os.cpu_count() where the platform has no affinity call)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env = os.environ.get(var, "")
        if env.isdigit() and int(env) > 0:
            return int(env)
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def _export_into_cache(cfg: EmbeddingRuntimeConfig, transformer: Any, tokenizer: Any, folder: Path) -> bool:
    """Export into `folder` unless a complete artefact is there; True when this call exported."""

    def write(tmp: Path) -> None:
        _export(cfg.backend, cfg.precision, transformer, tokenizer, tmp)
        RUNTIME_EXPORTS.labels(MODEL_LABEL, cfg.backend, cfg.precision).inc()
        (tmp / META).write_text(json.dumps({"backend": cfg.backend, "precision": cfg.precision, "recipe": RECIPE}))

    return export_once(folder, write)


def agreement_check(reference: np.ndarray, got: np.ndarray, min_cosine: float) -> CheckResult:
    """Row-wise cosine of unit vectors: the worst must reach `min_cosine`."""
    if reference.shape != got.shape:
        return CheckResult(False, {}, f"output shape {got.shape} differs from torch's {reference.shape}")
    if not np.isfinite(got).all():
        return CheckResult(False, {}, "non-finite embeddings")
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(got, axis=1)
    cos = (reference * got).sum(axis=1) / np.maximum(norms, 1e-12)
    numbers = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
    if numbers["min_cosine"] < min_cosine:
        return CheckResult(False, numbers, f"min cosine {numbers['min_cosine']:.4g} < {min_cosine:g}")
    return CheckResult(True, numbers)


def _check(
    cfg: EmbeddingRuntimeConfig, folder: Path, tokenizer: Any, reference: np.ndarray, threads: int
) -> tuple[Callable[[bool], Encode], Encode, CheckResult]:
    """The export in `folder` loaded, its vectors of CHECK_TEXTS against torch's `reference`."""
    new_encode = _load(cfg.backend, cfg.precision, folder, threads)
    encode = new_encode(False)
    starts = range(0, len(CHECK_TEXTS), CHECK_BATCH)  # small batches: the runtime keeps its peak buffers
    got = encode([tokenize_batch(tokenizer, CHECK_TEXTS[s : s + CHECK_BATCH]) for s in starts])
    return new_encode, encode, agreement_check(reference, np.concatenate(got), cfg.min_cosine)


def _serving(
    cfg: EmbeddingRuntimeConfig,
    folder: Path,
    new_encode: Callable[[bool], Encode],
    encode: Encode,
    result: CheckResult,
    exported: bool,
    against: str,
    dimension: int = 0,
) -> FastOutcome:
    RUNTIME_FALLBACK.labels(MODEL_LABEL).set(0)
    log.info(
        "embedder: serving %s/%s (%s cache %s), agreement with %s on %d held texts: %s",
        cfg.backend,
        cfg.precision,
        "exported into" if exported else "reused",
        folder,
        against,
        len(CHECK_TEXTS),
        result.summary(),
    )
    return FastOutcome(
        cfg.backend,
        cfg.precision,
        encode,
        new_encode,
        f"agreement check passed: {result.summary()}",
        result,
        exported,
        folder,
        dimension,
    )


def _publish(cfg: EmbeddingRuntimeConfig, result: CheckResult) -> None:
    for metric, value in result.numbers.items():
        RUNTIME_CHECK.labels(MODEL_LABEL, cfg.backend, cfg.precision, metric).set(value)


def open_checked_export(
    cfg: EmbeddingRuntimeConfig, cache_dir: Path, model_digest: str, tokenizer: Any, threads: int
) -> FastOutcome | None:
    """The cached export checked against the torch reference stored with it, without importing torch; None when
    the entry is incomplete (no export or no intact reference) or the check fails: then the caller loads torch and
    `prepare_fast_encoder` decides (and rewrites the reference). `model_digest`: `model_files_digest` of the
    model directory."""
    label = f"{cfg.backend}/{cfg.precision}"
    try:
        BACKENDS[cfg.backend](cfg.precision).available()
        max_len = int(tokenizer.truncation["max_length"])
        folder = cache_folder(cfg, cache_dir, model_digest, max_len)
        reference = load_reference(folder) if (folder / META).is_file() else None
        if reference is None:
            return None
        new_encode, encode, result = _check(cfg, folder, tokenizer, reference, threads)
    except Exception as exc:  # anything of the optional fast path: the torch path decides, and says why
        log.warning("embedder: %s not opened from its cache without torch (%s: %s)", label, type(exc).__name__, exc)
        return None
    if not result.passed:
        log.warning("embedder: %s failed the check against its stored torch reference: %s", label, result.why)
        return None
    _publish(cfg, result)
    against = "the torch reference stored with it"
    return _serving(cfg, folder, new_encode, encode, result, False, against, int(reference.shape[1]))


def prepare_fast_encoder(
    cfg: EmbeddingRuntimeConfig,
    cache_dir: Path,
    model_digest: str,
    transformer: Any,
    tokenizer: Any,
    reference: Callable[[list[str]], np.ndarray],
    threads: int,
) -> FastOutcome:
    """The configured backend when it runs here and agrees with torch; else FastOutcome() (torch) with the reason.
    Torch's check vectors are stored with the export unless an intact copy is there. Never raises for a problem
    of the fast path: the embedder always works in torch at worst."""
    if cfg.backend == "torch":
        RUNTIME_FALLBACK.labels(MODEL_LABEL).set(0)
        return FastOutcome()
    label = f"{cfg.backend}/{cfg.precision}"
    try:
        BACKENDS[cfg.backend](cfg.precision).available()
        max_len = int(tokenizer.truncation["max_length"])
        folder = cache_folder(cfg, cache_dir, model_digest, max_len)
        exported = _export_into_cache(cfg, transformer, tokenizer, folder)
        vectors = reference(CHECK_TEXTS)
        stored = load_reference(folder)
        if stored is None or stored.shape != vectors.shape or not np.allclose(stored, vectors, atol=1e-5):
            try:
                store_reference(folder, vectors)
            except OSError as exc:  # a read-only cache: the live check below still decides; later starts load torch
                log.warning("embedder: torch reference not stored in %s (%s): the next start loads torch", folder, exc)
        new_encode, encode, result = _check(cfg, folder, tokenizer, vectors, threads)
    except Exception as exc:  # any failure of the optional fast path: torch serves
        reason = exc.args[0] if isinstance(exc, BackendUnavailable) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, BackendUnavailable):
            log.exception("embedder: %s failed", label)
        return _fallback(f"{label} unavailable: {reason}")
    _publish(cfg, result)
    if not result.passed:
        return _fallback(f"{label} failed the agreement check against torch: {result.why} ({result.summary()})", result)
    return _serving(cfg, folder, new_encode, encode, result, exported, "torch")


def _fallback(why: str, check: CheckResult | None = None) -> FastOutcome:
    log.warning("embedder: torch serves instead of the configured runtime: %s", why)
    RUNTIME_FALLBACK.labels(MODEL_LABEL).set(1)
    return FastOutcome(note=f"torch serves: {why}", check=check)
