"""The embedder's fast CPU path: MiniLM exported once to OpenVINO or ONNX Runtime, kept only if it agrees
with torch (cosine >= min_cosine on held texts), else torch serves and the reason is logged and shown.

The export is cached like the model runtimes' (cxr_serving.runtimes): keyed by the weights' digest, the
backend, precision, export recipe and library versions, written into a temporary folder and renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_rag.config import EmbeddingRuntimeConfig
from cxr_serving.metrics import RUNTIME_CHECK, RUNTIME_EXPORTS, RUNTIME_FALLBACK
from cxr_serving.runtimes.backends import BACKENDS, BackendUnavailable
from cxr_serving.runtimes.check import CheckResult
from cxr_serving.runtimes.prepare import META, export_once, weights_digest

log = logging.getLogger(__name__)

MODEL_LABEL = "rag-embedder"  # the `model` label of the cxr_model_runtime_* metrics
RECIPE = "1: onnx opset 17, mean pooling and L2 norm in the graph; int8: NNCF transformer on CALIBRATION_TEXTS"
INPUTS = ("input_ids", "attention_mask")
CHECK_BATCH = 8

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


def cache_folder(cfg: EmbeddingRuntimeConfig, cache_dir: Path, digest: str, max_seq_length: int) -> Path:
    parts = {
        "weights": digest,
        "backend": cfg.backend,
        "precision": cfg.precision,
        "max_seq_length": max_seq_length,
        "versions": BACKENDS[cfg.backend](cfg.precision).versions(),
        "recipe": RECIPE,
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir / MODEL_LABEL / key


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


def prepare_fast_encoder(
    cfg: EmbeddingRuntimeConfig,
    cache_dir: Path,
    transformer: Any,
    tokenizer: Any,
    reference: Callable[[list[str]], np.ndarray],
    threads: int,
) -> FastOutcome:
    """The configured backend when it runs here and agrees with torch; else FastOutcome() (torch) with the reason.
    Never raises for a problem of the fast path: the embedder always works in torch at worst."""
    if cfg.backend == "torch":
        RUNTIME_FALLBACK.labels(MODEL_LABEL).set(0)
        return FastOutcome()
    label = f"{cfg.backend}/{cfg.precision}"
    try:
        BACKENDS[cfg.backend](cfg.precision).available()
        folder = cache_folder(cfg, cache_dir, weights_digest(transformer), int(tokenizer.truncation["max_length"]))
        exported = _export_into_cache(cfg, transformer, tokenizer, folder)
        new_encode = _load(cfg.backend, cfg.precision, folder, threads)
        encode = new_encode(False)
        starts = range(0, len(CHECK_TEXTS), CHECK_BATCH)  # small batches: the runtime keeps its peak buffers
        got = encode([tokenize_batch(tokenizer, CHECK_TEXTS[s : s + CHECK_BATCH]) for s in starts])
        result = agreement_check(reference(CHECK_TEXTS), np.concatenate(got), cfg.min_cosine)
    except Exception as exc:  # any failure of the optional fast path: torch serves
        reason = exc.args[0] if isinstance(exc, BackendUnavailable) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, BackendUnavailable):
            log.exception("embedder: %s failed", label)
        return _fallback(f"{label} unavailable: {reason}")
    for metric, value in result.numbers.items():
        RUNTIME_CHECK.labels(MODEL_LABEL, cfg.backend, cfg.precision, metric).set(value)
    if not result.passed:
        return _fallback(f"{label} failed the agreement check against torch: {result.why} ({result.summary()})", result)
    RUNTIME_FALLBACK.labels(MODEL_LABEL).set(0)
    log.info(
        "embedder: serving %s (%s cache %s), agreement with torch on %d held texts: %s",
        label,
        "exported into" if exported else "reused",
        folder,
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
    )


def _fallback(why: str, check: CheckResult | None = None) -> FastOutcome:
    log.warning("embedder: torch serves instead of the configured runtime: %s", why)
    RUNTIME_FALLBACK.labels(MODEL_LABEL).set(1)
    return FastOutcome(note=f"torch serves: {why}", check=check)
