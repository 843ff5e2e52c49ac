"""Choose what serves a model's forward at load: the configured runtime, exported once into the cache and
kept only if the accuracy check passes, else torch (float32, or its autocast under performance.use_amp) with the
reason in the log and ListModels."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cxr_serving.metrics import RUNTIME_CHECK, RUNTIME_EXPORTS, RUNTIME_FALLBACK
from cxr_serving.runtimes.backends import BACKENDS, Backend, BackendUnavailable, Forward
from cxr_serving.runtimes.calibration import load_inputs, split_images
from cxr_serving.runtimes.check import CheckResult, check_bounds, looser_than_issue
from cxr_serving.runtimes.config import ResolvedRuntime

log = logging.getLogger(__name__)

CHECK_BATCH = 8  # check images per forward: bounded memory at any input size
META = "meta.json"


@dataclass(frozen=True)
class RuntimeRequest:
    """What a model hands over: its float32 network (eval, CPU, returning one tensor), how images become its
    inputs, what identifies its weights, and how to judge an optimised output against float32's."""

    model: str
    module: Any
    input_shape: tuple[int, ...]  # one item, e.g. (3, 224, 224)
    identity: dict[str, Any]  # the checkpoint version, the weights' digest, the config that shapes the graph
    preprocess: Callable[[Any], Any]  # DecodedImage -> one input tensor
    judge: Callable[[Any, Any], CheckResult]  # (float32 outputs, optimised outputs) as numpy -> result
    transformer: bool = False
    max_batch_size: int = CHECK_BATCH  # the most items the model's batcher puts in one forward
    warm_up: Callable[[Forward], None] | None = None  # the model's warm-up, run on the runtime's forward


@dataclass(frozen=True)
class RuntimeReport:
    """The runtime metrics of one load as plain values: an instance process hands them back with the load,
    and the parent, whose /metrics is the one scraped, publishes them."""

    model: str
    backend: str  # configured, also when torch serves instead
    precision: str
    check: tuple[tuple[str, float], ...] = ()
    fallback: int = 0

    def publish(self) -> None:
        for metric, value in self.check:
            RUNTIME_CHECK.labels(self.model, self.backend, self.precision, metric).set(value)
        RUNTIME_FALLBACK.labels(self.model).set(self.fallback)


@dataclass
class RuntimeOutcome:
    """What serves: the runtime's forward (None: torch), its backend and precision, the check, the note."""

    backend: str = "torch"
    precision: str = "float32"
    forward: Forward | None = None
    note: str = ""  # ListModels' runtime_note: the check's numbers, or why torch serves instead
    check: CheckResult | None = None
    exported: bool = False  # this load exported (False: reused the cache)
    cache_path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    report: RuntimeReport | None = None  # the metrics this load published (an instance process hands them on)
    fallback_why: str = ""  # why the configured runtime does not serve ("" when it does or none is configured)

    def torch_serves(self, precision: str) -> RuntimeOutcome:
        """This fallback's note naming the precision torch serves in, known once the model has prepared its
        torch network (`performance.use_amp` may autocast it); unchanged when the configured runtime serves."""
        if not self.fallback_why:
            return self
        return replace(self, precision=precision, note=_fallback_note(precision, self.fallback_why))


def _fallback_note(precision: str, why: str) -> str:
    return f"{precision} torch serves: {why}"


def weights_digest(module: Any) -> str:
    """SHA-256 of every parameter and buffer, in order: the exact weights an artefact was made from."""
    import torch

    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(runtime: ResolvedRuntime, request: RuntimeRequest, backend: Backend, calibration: list[str]) -> str:
    """Everything the artefact depends on: weights, graph config, backend, precision, input shape, library
    versions, the backend's export recipe, the batch sizes it is built for (TensorRT's profile) and, for int8,
    the calibration images and the layers left in float."""
    parts = {
        "identity": request.identity,
        "backend": runtime.backend,
        "precision": runtime.precision,
        "input_shape": list(request.input_shape),
        "versions": backend.versions(),
        "recipe": backend.recipe,
        "calibration": calibration if runtime.precision == "int8" else [],
    }
    profile = backend.profile(request.input_shape)
    if profile is not None:  # only for a backend built for a batch range: the CPU backends' keys stay
        parts["profile"] = profile.key()
    if runtime.config.int8_float_layers:  # only when set: the keys of artefacts made before the setting stay
        parts["int8_float_layers"] = runtime.config.int8_float_layers
    settings = backend.build_settings()
    if settings:  # only a backend with such settings (TensorRT's TF32): the CPU backends' keys stay
        parts["settings"] = settings
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _batches(items: list[Any], max_batch: int) -> list[Any]:
    import torch

    size = max(1, min(CHECK_BATCH, max_batch))  # never past what the model's batcher (and an engine) takes
    return [torch.stack(items[i : i + size]) for i in range(0, len(items), size)]


def _run(forward: Callable[[Any], Any], items: list[Any], max_batch: int) -> Any:
    import numpy as np
    import torch

    with torch.inference_mode():
        return np.concatenate([forward(b).float().cpu().numpy() for b in _batches(items, max_batch)])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _export_tag() -> str:
    """`<host>-<pid>`: a pid is only meaningful on its host (a cache shared by pods has many pid spaces)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def remove_dead_exports(parent: Path) -> list[Path]:
    """Remove the private folders (`<key>.tmp-<host>-<pid>`) of this host's exports whose process is gone
    (killed mid-export): nothing else ever would. Those of live processes, and other hosts', stay."""
    removed = []
    for tmp in parent.glob(f"*.tmp-{socket.gethostname()}-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if tmp.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def export_once(folder: Path, write: Callable[[Path], None]) -> bool:
    """`write` an artefact into a private folder renamed to `folder` when complete, unless a complete one (its
    META file) is there already; True when this call exported. Concurrent loads of one key each export, and the
    first rename wins: nobody reads a half-written artefact."""
    if (folder / META).is_file():
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_exports(folder.parent)
    tmp = folder.with_name(f"{folder.name}.tmp-{_export_tag()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same export first: use its artefact
            if not (folder / META).is_file():
                raise
            return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a private file renamed over it: a reader sees the old or the new file whole
    (a file added to a cache entry after its export, e.g. the embedder's torch reference)."""
    tmp = path.with_name(f"{path.name}.tmp-{_export_tag()}-{threading.get_ident()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _export_into_cache(
    runtime: ResolvedRuntime, request: RuntimeRequest, backend: Backend, calibration: list[Any], folder: Path
) -> bool:
    """Export into `folder` unless a complete artefact is there already; True when this call exported."""

    profile = backend.profile(request.input_shape)

    def write(tmp: Path) -> None:
        import torch

        example = torch.zeros(1, *request.input_shape)
        backend.export(
            request.module, example, calibration, tmp, transformer=request.transformer,
            float_layers=tuple(runtime.config.int8_float_layers),
        )  # fmt: skip
        RUNTIME_EXPORTS.labels(request.model, runtime.backend, runtime.precision).inc()  # the work, even if unused
        (tmp / META).write_text(
            json.dumps(
                {
                    "model": request.model,
                    "backend": runtime.backend,
                    "precision": runtime.precision,
                    "identity": request.identity,
                    "input_shape": list(request.input_shape),
                    "profile": profile.key() if profile is not None else None,
                    "versions": backend.versions(),
                },
                indent=2,
                default=str,
            )
        )

    return export_once(folder, write)


def prepare_runtime(
    runtime: ResolvedRuntime | None, request: RuntimeRequest, *, device: str = "cpu", tf32: bool = True
) -> RuntimeOutcome:
    """The configured runtime when it can run here and passes the check; else torch, with the reason (the note
    says float32 until the model calls `torch_serves` with what it prepared). Never raises for a runtime
    problem: a model always loads in torch at worst. `device` is the model's
    (a GPU backend builds and runs there), `tf32` its performance.tf32."""
    if runtime is None or runtime.config.is_torch:
        report = RuntimeReport(request.model, "torch", "float32")
        report.publish()
        return RuntimeOutcome(report=report)
    stage = _Stage()
    try:
        outcome = _optimised(runtime, request, device, tf32, stage)
    except Exception as exc:  # any failure of an optional speed path: the model serves torch
        name = f"{runtime.backend}/{runtime.precision}"
        if isinstance(exc, BackendUnavailable):
            return _fallback(runtime, request, f"{name} unavailable: {exc.args[0]}")
        log.exception("model %s: runtime %s failed at %s", request.model, name, stage.name)
        return _fallback(runtime, request, f"{name} failed at {stage.name}: {type(exc).__name__}: {exc}")
    assert outcome.check is not None
    if not outcome.check.passed:
        return _fallback(
            runtime,
            request,
            f"{runtime.backend}/{runtime.precision} failed the accuracy check against float32 torch: "
            f"{outcome.check.why} ({outcome.check.summary()})",
            outcome.check,
        )
    outcome.report = _report(runtime, request, outcome.check, 0)
    log.info(
        "model %s: serving %s/%s (%s cache %s), accuracy check against float32 torch passed: %s; timings %s",
        request.model,
        runtime.backend,
        runtime.precision,
        "exported into" if outcome.exported else "reused",
        outcome.cache_path,
        outcome.note.removeprefix("accuracy check passed: "),
        {k: round(v, 2) for k, v in outcome.timings.items()},
    )
    loose = looser_than_issue(check_bounds(runtime.config))
    if loose:
        log.warning(
            "model %s: %s/%s passed a check looser than the issue's bounds: %s",
            request.model,
            runtime.backend,
            runtime.precision,
            ", ".join(loose),
        )
    return outcome


def _fallback(
    runtime: ResolvedRuntime, request: RuntimeRequest, why: str, check: CheckResult | None = None
) -> RuntimeOutcome:
    log.warning("model %s: serving torch instead of %s/%s: %s", request.model, runtime.backend, runtime.precision, why)
    report = _report(runtime, request, check, 1)
    return RuntimeOutcome(note=_fallback_note("float32", why), fallback_why=why, check=check, report=report)


def _report(
    runtime: ResolvedRuntime, request: RuntimeRequest, check: CheckResult | None, fallback: int
) -> RuntimeReport:
    numbers = tuple(check.numbers.items()) if check is not None else ()
    report = RuntimeReport(request.model, runtime.backend, runtime.precision, numbers, fallback)
    report.publish()
    return report


def _bounds_text(runtime: ResolvedRuntime) -> str:
    bounds = check_bounds(runtime.config)
    loose = looser_than_issue(bounds)
    text = ", ".join(f"{k}={v:g}" for k, v in bounds.items())
    if not bounds:
        return ""
    return f" (bounds {text}; LOOSER than the issue's: {', '.join(loose)})" if loose else f" (bounds {text})"


class _Stage:
    """The step a runtime's load is at: a failure's fallback reason names it."""

    name = "setup"


def _keep_newest_aside(folder: Path, keep: int = 1) -> None:
    """Delete all but the newest `keep` moved-aside artefacts of `folder` (their names sort by time)."""
    asides = sorted(folder.parent.glob(f"{folder.name}.unloadable-*"))
    for old in asides[: max(0, len(asides) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def _load_fresh(backend: Backend, folder: Path) -> Forward:
    """Load an artefact this call just exported; one that does not load is deleted, so the cache never keeps
    it (a later start exports afresh instead of moving it aside each time)."""
    try:
        return backend.load(folder)
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _optimised(
    runtime: ResolvedRuntime, request: RuntimeRequest, device: str, tf32: bool, stage: _Stage
) -> RuntimeOutcome:
    backend = BACKENDS[runtime.backend](
        runtime.precision, max_batch_size=request.max_batch_size, device=device, tf32=tf32
    )
    if runtime.backend != "tensorrt" and device != "cpu":
        raise BackendUnavailable(f"{runtime.backend} runs on the CPU and this model is on {device}")
    backend.available()
    stage.name = "calibration images"
    cfg = runtime.config
    timings: dict[str, float] = {}
    started = time.perf_counter()
    calibrating = runtime.precision == "int8"  # only int8 calibrates: the others need the check images alone
    split = split_images(runtime.calibration_dir, cfg.calibration_images if calibrating else 0, cfg.check_images)
    check_inputs = load_inputs(split.check, request.preprocess)
    stage.name = "cache key"
    key = cache_key(runtime, request, backend, [p.name for p in split.calibration])
    stage.name = "calibration images"
    folder = runtime.cache_dir / request.model / key
    calibration: list[Any] = []
    if calibrating and not (folder / META).is_file():
        calibration = load_inputs(split.calibration, request.preprocess)
    timings["images_s"] = time.perf_counter() - started
    started = time.perf_counter()
    stage.name = "export"
    exported = _export_into_cache(runtime, request, backend, calibration, folder)
    timings["export_s" if exported else "cache_s"] = time.perf_counter() - started
    started = time.perf_counter()
    stage.name = "load"
    try:
        forward = _load_fresh(backend, folder) if exported else backend.load(folder)
    except Exception as exc:
        if exported:  # a fresh export that does not load (deleted): exporting again now would not help
            raise
        aside = folder.with_name(f"{folder.name}.unloadable-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        log.warning(
            "model %s: cached export %s does not load (%s: %s): moved aside to %s, exporting once more",
            request.model, folder, type(exc).__name__, exc, aside.name,
        )  # fmt: skip
        folder.rename(aside)
        _keep_newest_aside(folder)
        if calibrating and not calibration:
            calibration = load_inputs(split.calibration, request.preprocess)
        stage.name = "export"
        exported = _export_into_cache(runtime, request, backend, calibration, folder)
        timings["export_s"] = time.perf_counter() - started
        started = time.perf_counter()
        stage.name = "load"
        forward = _load_fresh(backend, folder) if exported else backend.load(folder)
    timings["compile_s"] = time.perf_counter() - started
    if request.warm_up is not None:  # inside the fallback: a runtime that fails its first batches never serves
        stage.name = "warm-up"
        started = time.perf_counter()
        request.warm_up(forward)
        timings["warmup_s"] = time.perf_counter() - started
    stage.name = "check"
    started = time.perf_counter()
    reference = _run(request.module, check_inputs, request.max_batch_size)
    got = _run(forward, check_inputs, request.max_batch_size)
    result = request.judge(reference, got)
    timings["check_s"] = time.perf_counter() - started
    return RuntimeOutcome(
        runtime.backend,
        runtime.precision,
        forward,
        f"accuracy check passed: {result.summary()}{_bounds_text(runtime)}",
        result,
        exported,
        folder,
        timings,
    )
