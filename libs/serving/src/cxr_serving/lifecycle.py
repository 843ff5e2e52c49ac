"""Model lifecycle (KServe/Triton style): load -> ready -> predict(batch) -> unload.

A service implements `ServedModel` for each of its models; `ModelRepository` owns them,
loads them off the event loop, puts a `DynamicBatcher` in front of each, and tells the
server when every enabled model is ready. No gRPC here.

Reloading a model that serves is validate-then-swap (Triton's model control does the same): the
new version loads into a fresh instance (built by the model's factory) or fresh instance
processes while the old one keeps answering; only a load that succeeded replaces it, and the old
one is drained (its running forwards finish, up to `shutdown_grace_s`) before it is unloaded. A
refused checkpoint leaves the served version as it was. Unload drains the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cxr_serving.batcher import Arrival, DynamicBatcher
from cxr_serving.errors import ConfigError, CxrError, InvalidInputError, ModelNotFoundError, ModelNotReadyError
from cxr_serving.instances import LoadedModel, ModelFactory, ProcessInstances
from cxr_serving.metrics import MODEL_LOADED, MetricsObserver
from cxr_serving.settings import ServerConfig

if TYPE_CHECKING:
    from cxr_serving.images import DecodedImage

log = logging.getLogger(__name__)

UNTRAINED = "untrained"
_T = TypeVar("_T")


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class ModelStatus:
    """What ListModels reports about a model."""

    name: str
    state: ModelState = ModelState.UNLOADED
    version: str = ""
    untrained: bool = False
    architecture: str = ""
    labels: list[str] = field(default_factory=list)
    device: str = ""
    precision: str = ""
    backend: str = ""  # what runs the forward: torch, openvino, onnxruntime or tensorrt (models.<name>.runtime)
    runtime_note: str = ""  # the runtime's load-time check, or why float32 torch serves instead of it
    task: str = ""  # the config entry's task (model_tasks.py)
    checkpoint: str = ""  # the file the serving version loaded ("" untrained): its model card lies next to it
    preprocessing: dict[str, str] = field(default_factory=dict)  # as the loaded model applies it (model card)
    error: str = ""
    load_seconds: float = 0.0


@dataclass(frozen=True)
class ThresholdOverride:
    """Decision thresholds by label that a LoadModel sets for one load (e.g. chosen by `cxr evaluate`),
    with the model version they were chosen for: a checkpoint of another version is refused."""

    values: Mapping[str, float]
    model_version: str


def checkpoint_version(path: Path, length: int = 12) -> str:
    """Short SHA-256 of the checkpoint file: the model version in every response."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


class ServedModel(ABC):
    """One model as the runtime sees it. Implementations do the heavy work synchronously;
    the repository calls them on worker threads."""

    name: str
    architecture: str = ""
    task: str = ""  # e.g. "binary_classification" (model_tasks.py); ListModels reports it
    labels: Sequence[str] = ()

    accepts_thresholds: bool = False  # True for models whose outputs are compared with decision thresholds

    @abstractmethod
    def load(self, checkpoint_path: Path | None = None) -> None:
        """Build the network, load weights (or refuse), move to device, warm up."""

    def load_with(self, checkpoint_path: Path | None, thresholds: ThresholdOverride) -> None:
        """`load` with thresholds that replace the configured ones until the next load; only models with
        `accepts_thresholds` implement it, so a threshold is never accepted and then ignored."""
        raise InvalidInputError(
            f"model '{self.name}' has no decision thresholds to set", reason="THRESHOLDS_NOT_SUPPORTED"
        )

    def preprocess(self, decoded: DecodedImage) -> Any:
        """One request's decoded image -> one input of `predict` (KServe's `preprocess`, LitServe's
        `decode_request`). The runtime does not call it on its own: the service's request path does, per
        request on the decode pool (`binding.infer`; classification's pipeline.py and segmentation's
        servicer.py call it themselves), so batches hold only the forward pass. Default: the grayscale pixels."""
        return decoded.pixels

    @abstractmethod
    def predict(self, batch: list[Any]) -> Sequence[Any]:
        """Run one forward pass over preprocessed inputs; one output per input."""

    def postprocess(self, output: Any, options: Any = None) -> Any:
        """One output of `predict` -> the service's domain result, with the request's `options`
        (KServe's `postprocess`, LitServe's `encode_response`). Called per request, off the batch, by the
        same request paths as `preprocess`. Default: the output unchanged."""
        return output

    def unload(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release memory. Default: nothing to do."""

    @property
    @abstractmethod
    def version(self) -> str:
        """Checkpoint hash, or 'untrained'."""

    @property
    def untrained(self) -> bool:
        return self.version == UNTRAINED

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def checkpoint(self) -> Path | None:
        """The checkpoint file the loaded version came from (None: untrained), where its model card lives."""
        return None

    @property
    def preprocessing(self) -> dict[str, str]:
        """How this model turns a decoded image into its input (the model card's preprocessing)."""
        return {}

    @property
    def precision(self) -> str:
        """Arithmetic the forward runs in: 'float32', or 'bfloat16'/'float16' under AMP."""
        return "float32"

    @property
    def backend(self) -> str:
        """What runs the forward: 'torch', or the runtime of `models.<name>.runtime` that passed its check."""
        return "torch"

    @property
    def runtime_note(self) -> str:
        """The configured runtime's load-time check, or why float32 torch serves instead; '' for plain torch."""
        return ""


@dataclass
class BatchingConfig:
    max_batch_size: int = 8
    max_batch_delay_ms: float = 5.0
    max_queue_size: int = 256
    model_instances: int = 1  # batches of one model running at once
    instance_mode: str = "thread"  # or "process": each instance a worker process (instances.py)
    drain_grace_s: float = 30.0  # unload/reload waits this long for forwards already running

    @classmethod
    def from_settings(
        cls, sc: ServerConfig, *, max_batch_size: int | None = None, max_batch_delay_ms: float | None = None
    ) -> BatchingConfig:
        """`server_config`'s batching; a model section may override the batch size and delay."""
        return cls(
            max_batch_size or sc.max_batch_size,
            sc.max_batch_delay_ms if max_batch_delay_ms is None else max_batch_delay_ms,
            sc.max_queue_size,
            sc.model_instances,
            sc.model_instance_mode,
            sc.shutdown_grace_s,
        )


class ModelRepository:
    """Owns a service's models, their batchers and their states."""

    def __init__(self, batching: BatchingConfig, on_ready_change: Callable[[bool], None] | None = None) -> None:
        self._batching = batching
        self._model_batching: dict[str, BatchingConfig] = {}  # per-model batch size/delay overrides
        self._models: dict[str, ServedModel] = {}
        self._required: set[str] = set()
        self._status: dict[str, ModelStatus] = {}
        self._batchers: dict[str, DynamicBatcher[Any, Any]] = {}
        self._factories: dict[str, ModelFactory] = {}
        self._processes: dict[str, ProcessInstances] = {}  # model_instance_mode: process
        self._serving: dict[str, ServedModel] = {}  # thread mode: the loaded instance behind each batcher
        self._locks: dict[str, asyncio.Lock] = {}
        self._admin_tasks: set[asyncio.Task[ModelStatus]] = set()  # loads/unloads, shielded from their callers
        self.on_ready_change = on_ready_change
        self._observer = MetricsObserver()

    def add(
        self,
        model: ServedModel,
        *,
        required: bool = True,
        factory: ModelFactory | None = None,
        batching: BatchingConfig | None = None,
    ) -> None:
        """Register a model; `required` ones gate readiness (the enabled models of the config).
        `batching` gives this model its own batch size and delay (default: the repository's).

        `factory` (picklable, no arguments) builds the same model, unloaded, in another process:
        with `model_instance_mode: process` each instance process calls it, and `model` itself
        stays unloaded here (its config, labels and preprocessing still serve the servicer)."""
        if self._batching.instance_mode == "process" and factory is None:
            raise ConfigError(
                f"model '{model.name}' cannot run in instance processes: its service passes no factory; "
                "set server_config.model_instance_mode: thread"
            )
        self._models[model.name] = model
        if batching is not None:
            self._model_batching[model.name] = batching
        if factory is not None:
            self._factories[model.name] = factory
        self._status[model.name] = ModelStatus(
            model.name, architecture=model.architecture, task=model.task, labels=list(model.labels)
        )
        if required:
            self._required.add(model.name)
        MODEL_LOADED.labels(model.name).set(0)

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def model(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFoundError(f"unknown model '{name}'; known: {sorted(self._models)}") from None

    def status(self, name: str) -> ModelStatus:
        self.model(name)
        return self._status[name]

    def statuses(self) -> list[ModelStatus]:
        return [self._status[n] for n in self._models]

    @property
    def ready(self) -> bool:
        return all(self._status[n].state is ModelState.READY for n in self._required)

    def is_ready(self, name: str) -> bool:
        return self.status(name).state is ModelState.READY

    def _notify(self) -> None:
        if self.on_ready_change is not None:
            self.on_ready_change(self.ready)

    async def _admin(self, body: Coroutine[Any, Any, ModelStatus]) -> ModelStatus:
        """Run a load/unload as its own task, shielded: a caller that goes away (an RPC deadline
        cancels its handler) must not leave the model half loaded or half freed."""
        task = asyncio.ensure_future(body)
        self._admin_tasks.add(task)
        task.add_done_callback(self._admin_tasks.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():  # the caller left: the operation completes on its own; log its failure
                task.add_done_callback(_log_orphan_failure)
            raise

    async def load(
        self, name: str, checkpoint_path: Path | None = None, thresholds: ThresholdOverride | None = None
    ) -> ModelStatus:
        """Load (or reload) a model, with `thresholds` replacing the configured ones for this load. While
        a version serves, a new one that fails to load is refused and the served one keeps answering;
        one that loads replaces it (module docstring)."""
        model = self.model(name)
        return await self._admin(self._load(name, model, checkpoint_path, thresholds))

    async def _load(
        self, name: str, model: ServedModel, checkpoint_path: Path | None, thresholds: ThresholdOverride | None
    ) -> ModelStatus:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            st = self._status[name]
            swap = name in self._batchers and (self._batching.instance_mode == "process" or name in self._factories)
            if not swap:  # nothing serves (or no factory to build a second instance): load in place
                await self._stop_serving(name)
                st.state, st.error = ModelState.LOADING, ""
                MODEL_LOADED.labels(name).set(0)
                self._notify()
            started = time.perf_counter()
            try:
                instance, loaded, run_batch = await self._load_instances(model, checkpoint_path, thresholds, fresh=swap)
            except BaseException as exc:
                error = exc.message if isinstance(exc, CxrError) else f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, Exception):  # cancelled (shutdown): nothing half-loaded serves
                    error = f"load interrupted ({type(exc).__name__})"
                if swap:
                    log.error(
                        "model %s: refused the new version, version %s keeps serving: %s", name, st.version, error
                    )
                    raise
                st.state, st.error = ModelState.FAILED, error
                log.error("model %s failed to load: %s", name, st.error)
                self._notify()
                raise
            old_batcher = self._batchers.get(name)
            old_instance = self._serving.pop(name, None)
            old_processes = self._processes.pop(name, None)
            if isinstance(instance, ProcessInstances):
                self._processes[name] = instance
            else:
                self._serving[name] = instance
            st.load_seconds = time.perf_counter() - started
            st.state, st.error, st.version, st.untrained = ModelState.READY, "", loaded.version, loaded.untrained
            st.device, st.architecture, st.labels = loaded.device, loaded.architecture, list(loaded.labels)
            st.precision, st.backend, st.runtime_note = loaded.precision, loaded.backend, loaded.runtime_note
            st.checkpoint, st.preprocessing = loaded.checkpoint, dict(loaded.preprocessing)
            batching = self._model_batching.get(name, self._batching)
            self._batchers[name] = DynamicBatcher(
                name,
                run_batch,
                max_batch_size=batching.max_batch_size,
                max_batch_delay_ms=batching.max_batch_delay_ms,
                max_queue_size=self._batching.max_queue_size,
                observer=self._observer,
                max_concurrent_batches=self._batching.model_instances,
                announced_arrivals=True,
            )
            MODEL_LOADED.labels(name).set(1)
            log.info(
                "model %s ready: version=%s device=%s backend=%s precision=%s in %.1fs%s",
                name,
                st.version,
                st.device,
                st.backend,
                st.precision,
                st.load_seconds,
                " (UNTRAINED: random weights)" if st.untrained else "",
            )
            self._notify()
            try:
                if old_batcher is not None:  # the swap: new requests already go to the new version
                    await self._retire(name, old_batcher, old_instance if old_instance is not instance else None)
            finally:  # even when the drain is cancelled (shutdown), the old processes stop
                if old_processes is not None:
                    await asyncio.to_thread(old_processes.close)
            return st

    async def load_all(self) -> None:
        """Load every required model; failures are logged and leave the service NOT_SERVING."""
        results = await asyncio.gather(
            *(self.load(n) for n in self._models if n in self._required), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r

    async def unload(self, name: str) -> ModelStatus:
        """Stop serving: new requests are refused at once, running forwards finish (up to the drain
        grace), and only then are the weights freed."""
        model = self.model(name)
        return await self._admin(self._unload(name, model))

    async def _unload(self, name: str, model: ServedModel) -> ModelStatus:
        async with self._locks.setdefault(name, asyncio.Lock()):
            st = self._status[name]
            st.state, st.error = ModelState.UNLOADED, ""
            MODEL_LOADED.labels(name).set(0)
            self._notify()
            serving = self._serving.get(name)
            await self._stop_serving(name)
            if serving is not model:  # the registered instance too (a no-op when it never loaded)
                await asyncio.to_thread(model.unload)
            return st

    @contextlib.contextmanager
    def expect(self, names: Sequence[str]) -> Iterator[dict[str, Arrival]]:
        """Announce a request for these models as it arrives, before decoding; pass each model's
        Arrival to `predict`. A batch then waits only for requests that exist, and an overloaded
        model refuses the request here, before the decode (batcher.py)."""
        arrivals: dict[str, Arrival] = {}
        try:
            for n in names:  # a model that sheds here withdraws the announcements made before it
                batcher = self._batchers.get(n)
                if batcher is not None:
                    arrivals[n] = batcher.expect()
            yield arrivals
        finally:
            for a in arrivals.values():
                a.done()

    async def predict(self, name: str, item: Any, arrival: Arrival | None = None) -> Any:
        """Queue one preprocessed input for the model's next batch (`arrival`: from `expect`, which
        withdraws it if this raises before submitting)."""
        self.model(name)
        batcher = self._batchers.get(name)
        if batcher is None:
            st = self._status[name]
            detail = f": {st.error}" if st.error else ""
            raise ModelNotReadyError(f"model '{name}' is {st.state.value}{detail}", metadata={"model": name})
        return await batcher.submit(item, arrival)

    async def _load_instances(
        self, model: ServedModel, checkpoint_path: Path | None, thresholds: ThresholdOverride | None, *, fresh: bool
    ) -> tuple[ServedModel | ProcessInstances, LoadedModel, Callable[[list[Any]], Sequence[Any]]]:
        """Load the model here (thread instances) or in `model_instances` new worker processes;
        `fresh`: into a new instance from the factory, leaving the one that serves untouched."""
        if self._batching.instance_mode == "process":
            processes = ProcessInstances(model.name, self._factories[model.name], self._batching.model_instances)
            try:
                loaded = await _in_thread(processes.start, checkpoint_path, thresholds)
            except BaseException:  # a failed start killed its processes; a cancelled one may have them all
                await asyncio.to_thread(processes.close)
                raise
            return processes, loaded, processes.predict
        instance = model
        if fresh:
            instance = await _in_thread(self._factories[model.name])
        try:
            if thresholds is None:
                await _in_thread(instance.load, checkpoint_path)
            else:
                await _in_thread(instance.load_with, checkpoint_path, thresholds)
        except BaseException:  # free what the load built: weights nobody serves
            await asyncio.to_thread(instance.unload)
            raise
        return instance, LoadedModel.of(instance), instance.predict

    async def _retire(self, name: str, batcher: DynamicBatcher[Any, Any], instance: ServedModel | None) -> None:
        """Drain a batcher (waiting callers answered, running forwards finished), then free its weights."""
        grace = self._batching.drain_grace_s
        if not await batcher.close(grace):
            log.warning("model %s: a forward still runs after the %.0fs drain grace; freeing anyway", name, grace)
        if instance is not None:
            await asyncio.to_thread(instance.unload)

    async def _stop_serving(self, name: str) -> None:
        """Drain and close the model's batcher and free its instance, then stop its processes."""
        batcher = self._batchers.pop(name, None)
        instance = self._serving.pop(name, None)
        processes = self._processes.pop(name, None)
        try:
            if batcher is not None:
                await self._retire(name, batcher, instance)
            elif instance is not None:
                await asyncio.to_thread(instance.unload)
        finally:  # even when the drain is cancelled, the processes stop
            if processes is not None:
                await asyncio.to_thread(processes.close)

    async def close(self) -> None:
        """Stop every model at once (one drain grace for all, not one each); a load or unload still
        running is cancelled first and releases what it built."""
        for task in list(self._admin_tasks):
            task.cancel()
        await asyncio.gather(*self._admin_tasks, return_exceptions=True)
        names = set(self._batchers) | set(self._processes)
        await asyncio.gather(*(self._stop_serving(n) for n in names))


async def _in_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """`asyncio.to_thread`, but a cancellation first waits for the thread (which cannot be stopped), so
    the caller's cleanup sees everything it built."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        if not fut.cancelled():
            fut.exception()  # retrieved: its own outcome is superseded by the cancellation
        raise


def _log_orphan_failure(task: asyncio.Task[ModelStatus]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("a model load/unload whose caller left failed: %s", exc)
