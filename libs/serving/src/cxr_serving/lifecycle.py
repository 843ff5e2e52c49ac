"""Model lifecycle (KServe/Triton style): load -> ready -> predict(batch) -> unload.

A service implements `ServedModel` for each of its models; `ModelRepository` owns them,
loads them off the event loop, puts a `DynamicBatcher` in front of each, and tells the
server when every enabled model is ready. No gRPC here.

Reloading a model that serves is validate-then-swap (Triton's model control does the same): the
new version loads into a fresh instance (built by the model's factory) or fresh instance
processes while the old one keeps answering; only a load that succeeded replaces it, and the old
one is drained (the requests already sent to it are answered and its running forwards finish, up
to `shutdown_grace_s`) before it is unloaded. A refused checkpoint leaves the served version as it
was. Unloading one version drains the same way; unloading the whole model refuses what is queued.
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
from cxr_serving.errors import (
    ConfigError,
    CxrError,
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    VersionStateError,
)
from cxr_serving.handoff import start_on_new_thread
from cxr_serving.instances import LoadedModel, ModelFactory, ProcessInstances
from cxr_serving.metrics import (
    MODEL_LOADED,
    MODEL_MEMORY,
    SHADOW_DELTA,
    SHADOW_DROPPED,
    SHADOW_FLIPS,
    SHADOW_REQUESTS,
    VERSION_DURATION,
    VERSION_REQUESTS,
    MetricsObserver,
)
from cxr_serving.settings import ServerConfig
from cxr_serving.urgency import ROUTINE, Priority, Urgency
from cxr_serving.versions import VersionPolicy, VersionRoute, check_percent

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
    runtime_note: str = ""  # the runtime's load-time check, or why torch serves instead of it
    task: str = ""  # the config entry's task (model_tasks.py)
    checkpoint: str = ""  # the file the serving version loaded ("" untrained): its model card lies next to it
    preprocessing: dict[str, str] = field(default_factory=dict)  # as the loaded model applies it (model card)
    error: str = ""
    load_seconds: float = 0.0
    # versions side by side (versions.py): what this version does, its share of unpinned requests
    role: str = ""
    traffic_percent: float = 0.0
    shadow_percent: float = 0.0
    version_policy: str = ""
    memory: dict[str, int] = field(default_factory=dict)  # parameter and buffer bytes by device type
    gpu_allocated_delta: int = 0  # torch.cuda.memory_allocated after - before its load (thread instances on CUDA)


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

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of the loaded weights by device type ("cpu", "cuda"), which ListModels reports per version.
        Default: none known."""
        return {}

    def shadow_input(self, item: Any) -> Any:
        """The input a shadow run of a preprocessed `item` gets (e.g. without costly extras such as heatmaps)."""
        return item

    def disagreement(self, serving: Any, candidate: Any) -> Mapping[str, tuple[float, bool]] | None:
        """Per label, |serving - candidate| probability and whether the decision flips, for two outputs of
        `predict` on one input; None (the default) when the model's outputs cannot be compared, and such a
        model cannot have a shadow candidate."""
        return None

    @classmethod
    def compares_outputs(cls) -> bool:
        return cls.disagreement is not ServedModel.disagreement

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
        """The configured runtime's load-time check, or why torch serves instead; '' for plain torch."""
        return ""


@dataclass
class BatchingConfig:
    max_batch_size: int = 8
    max_batch_delay_ms: float = 5.0
    max_queue_size: int = 256
    model_instances: int = 1  # batches of one model running at once
    instance_mode: str = "thread"  # or "process": each instance a worker process (instances.py)
    drain_grace_s: float = 30.0  # a retired version answers its queue and finishes its forwards within this

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


@dataclass
class Dispatch:
    """Where one request for one model goes, chosen when it arrives: the version (pinned by the request,
    the canary share or the serving version), how it was chosen, its announcement to that version's
    batcher, and the candidate to shadow it on ("" none). `version` is the one that answered once
    `predict` returns."""

    version: str
    route: str
    arrival: Arrival | None = None
    shadow: str = ""
    status: ModelStatus | None = None  # the answering version's status, set by `predict`

    @property
    def pinned(self) -> bool:
        return self.route == "pinned"

    def done(self) -> None:
        if self.arrival is not None:
            self.arrival.done()


@dataclass
class _Version:
    """One loaded version of a model: its status, its batcher, and what runs its forwards."""

    status: ModelStatus
    batcher: DynamicBatcher[Any, Any]
    instance: ServedModel | None = None  # thread instances
    processes: ProcessInstances | None = None  # model_instance_mode: process
    shadow_in_flight: int = 0


class ModelRepository:
    """Owns a service's models, their loaded versions, their batchers and their states."""

    def __init__(
        self,
        batching: BatchingConfig,
        on_ready_change: Callable[[bool], None] | None = None,
        *,
        shadow_max_in_flight: int = 4,
    ) -> None:
        self._batching = batching
        self._model_batching: dict[str, BatchingConfig] = {}  # per-model batch size/delay overrides
        self._models: dict[str, ServedModel] = {}
        self._required: set[str] = set()
        self._status: dict[str, ModelStatus] = {}  # the model's state; its serving version's status once ready
        self._versions: dict[str, dict[str, _Version]] = {}  # name -> version -> what serves it
        self._retiring: dict[tuple[str, str], _Version] = {}  # versions draining their queued requests
        self._routes: dict[str, VersionRoute] = {}
        self._factories: dict[str, ModelFactory] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._admin_tasks: set[asyncio.Task[ModelStatus]] = set()  # loads/unloads, shielded from their callers
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self.shadow_max_in_flight = shadow_max_in_flight  # per candidate; more shadow work is dropped
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
        stays unloaded here (its config, labels and preprocessing still serve the servicer). It also
        builds the fresh instance a reload or a second version loads into."""
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
        self._status[model.name] = self._blank_status(model)
        self._routes[model.name] = VersionRoute()
        if required:
            self._required.add(model.name)
        MODEL_LOADED.labels(model.name).set(0)

    @staticmethod
    def _blank_status(model: ServedModel, state: ModelState = ModelState.UNLOADED) -> ModelStatus:
        return ModelStatus(
            model.name, state=state, architecture=model.architecture, task=model.task, labels=list(model.labels)
        )

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

    def version_status(self, name: str, version: str) -> ModelStatus:
        """The status of one loaded version; NOT_FOUND names the loaded ones."""
        return self._version(name, version).status

    def version_statuses(self) -> list[ModelStatus]:
        """Every loaded version of every model (the serving one first), and each model with none loaded."""
        out: list[ModelStatus] = []
        for name in self._models:
            versions = self._versions.get(name, {})
            if not versions:
                out.append(self._status[name])
                continue
            serving = self._routes[name].serving
            out += sorted((v.status for v in versions.values()), key=lambda s: s.version != serving)
        return out

    @property
    def ready(self) -> bool:
        return all(self._status[n].state is ModelState.READY for n in self._required)

    def is_ready(self, name: str) -> bool:
        return self.status(name).state is ModelState.READY

    def _notify(self) -> None:
        if self.on_ready_change is not None:
            self.on_ready_change(self.ready)

    def _version(self, name: str, version: str) -> _Version:
        self.model(name)
        try:
            return self._versions.get(name, {})[version]
        except KeyError:
            loaded = sorted(self._versions.get(name, {}))
            raise ModelNotFoundError(
                f"model '{name}' has no version '{version}' loaded; loaded versions: {loaded}",
                reason="MODEL_VERSION_NOT_FOUND",
                metadata={"model": name, "version": version},
            ) from None

    def batcher(self, name: str, version: str = "") -> DynamicBatcher[Any, Any] | None:
        """The batcher of a loaded version (default: the serving one); None when nothing serves."""
        slot = self._version(name, version) if version else self._serving_version(name)
        return slot.batcher if slot is not None else None

    def _serving_version(self, name: str) -> _Version | None:
        return self._versions.get(name, {}).get(self._routes[name].serving)

    def _refresh(self, name: str) -> None:
        """Roles and shares of every loaded version, and the model's status, after any routing change."""
        route = self._routes[name]
        for version, slot in self._versions.get(name, {}).items():
            st = slot.status
            st.role, st.traffic_percent = route.role(version).value, route.share(version)
            st.shadow_percent = route.shadow_percent if version == route.candidate else 0.0
            st.version_policy = route.policy.value
        serving = self._serving_version(name)
        if serving is not None:
            self._status[name] = serving.status

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
        self,
        name: str,
        checkpoint_path: Path | None = None,
        thresholds: ThresholdOverride | None = None,
        *,
        side_by_side: bool = False,
    ) -> ModelStatus:
        """Load (or reload) a model, with `thresholds` replacing the configured ones for this load. While
        a version serves, a new one that fails to load is refused and the served one keeps answering;
        one that loads replaces it (module docstring), unless `side_by_side` (or the model's PINNED
        policy) loads it beside the serving version, which keeps serving."""
        model = self.model(name)
        return await self._admin(self._load(name, model, checkpoint_path, thresholds, side_by_side))

    async def _load(
        self,
        name: str,
        model: ServedModel,
        checkpoint_path: Path | None,
        thresholds: ThresholdOverride | None,
        side_by_side: bool,
    ) -> ModelStatus:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            route = self._routes[name]
            versions = self._versions.setdefault(name, {})
            fresh_instances = self._batching.instance_mode == "process" or name in self._factories
            serves = self._serving_version(name) is not None
            beside = serves and (side_by_side or route.policy is VersionPolicy.PINNED)
            if beside and not fresh_instances:
                raise VersionStateError(
                    f"model '{name}' cannot load a second version: its service builds no second instance",
                    reason="MODEL_VERSIONS_UNSUPPORTED",
                )
            swap = serves and fresh_instances
            if not swap:  # nothing serves (or no factory to build a second instance): load in place
                await self._stop_all(name)
                route, versions = self._routes[name], self._versions.setdefault(name, {})
                self._status[name] = self._blank_status(model, ModelState.LOADING)
                MODEL_LOADED.labels(name).set(0)
                self._notify()
            st = self._status[name]
            started = time.perf_counter()
            gpu_before = _gpu_allocated()
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
            if beside and loaded.version in versions:
                await _free(instance)
                raise VersionStateError(
                    f"model '{name}' version {loaded.version} is already loaded "
                    f"({versions[loaded.version].status.role}); unload {name}@{loaded.version} first",
                    reason="MODEL_VERSION_ALREADY_LOADED",
                )
            new = ModelStatus(
                name,
                state=ModelState.READY,
                version=loaded.version,
                untrained=loaded.untrained,
                architecture=loaded.architecture,
                labels=list(loaded.labels),
                device=loaded.device,
                precision=loaded.precision,
                backend=loaded.backend,
                runtime_note=loaded.runtime_note,
                task=model.task,
                checkpoint=loaded.checkpoint,
                preprocessing=dict(loaded.preprocessing),
                load_seconds=time.perf_counter() - started,
                memory=dict(loaded.memory),
                gpu_allocated_delta=max(0, _gpu_allocated() - gpu_before),
            )
            batching = self._model_batching.get(name, self._batching)
            slot = _Version(
                new,
                DynamicBatcher(
                    name,
                    run_batch,
                    max_batch_size=batching.max_batch_size,
                    max_batch_delay_ms=batching.max_batch_delay_ms,
                    max_queue_size=self._batching.max_queue_size,
                    observer=self._observer,
                    max_concurrent_batches=self._batching.model_instances,
                    announced_arrivals=True,
                ),
            )
            if isinstance(instance, ProcessInstances):
                slot.processes = instance
            else:
                slot.instance = instance
            retired: list[_Version] = []
            if not beside:  # the new version serves; the one it replaces (and an older copy of it) retire
                for old in {route.serving, loaded.version}:
                    if old in versions:
                        retired.append(versions.pop(old))
                        route.forget(old)
                        _forget_memory(name, old)
                route.serving = loaded.version
            versions[loaded.version] = slot
            for device, size in new.memory.items():
                MODEL_MEMORY.labels(name, loaded.version, device).set(size)
            self._refresh(name)
            MODEL_LOADED.labels(name).set(1)
            log.info(
                "model %s %s: version=%s device=%s backend=%s precision=%s in %.1fs%s",
                name,
                "loaded beside the serving version" if beside else "ready",
                new.version,
                new.device,
                new.backend,
                new.precision,
                new.load_seconds,
                " (UNTRAINED: random weights)" if new.untrained else "",
            )
            self._notify()
            # the swap: new requests already go to the new version; the old ones answer what they have
            await asyncio.gather(*(self._stop_version(name, old, exclude=instance, drain=True) for old in retired))
            return new

    async def load_all(self) -> None:
        """Load every required model; failures are logged and leave the service NOT_SERVING."""
        results = await asyncio.gather(
            *(self.load(n) for n in self._models if n in self._required), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r

    async def unload(self, name: str, version: str = "") -> ModelStatus:
        """Stop serving: new requests are refused at once, running forwards finish (up to the drain
        grace), and only then are the weights freed. With `version`, only that version, which must not
        be the serving one."""
        model = self.model(name)
        if version:
            return await self._admin(self._unload_version(name, version))
        return await self._admin(self._unload(name, model))

    async def _unload(self, name: str, model: ServedModel) -> ModelStatus:
        async with self._locks.setdefault(name, asyncio.Lock()):
            st = self._status[name] = self._blank_status(model)
            MODEL_LOADED.labels(name).set(0)
            self._notify()
            instances = [v.instance for v in self._versions.get(name, {}).values()]
            await self._stop_all(name)
            if model not in instances:  # the registered instance too (a no-op when it never loaded)
                await asyncio.to_thread(model.unload)
            return st

    async def _unload_version(self, name: str, version: str) -> ModelStatus:
        async with self._locks.setdefault(name, asyncio.Lock()):
            slot = self._version(name, version)
            route = self._routes[name]
            if version == route.serving:
                raise VersionStateError(
                    f"model '{name}' version {version} serves: promote or roll back to another version first, "
                    f"or unload '{name}' with every version",
                    reason="MODEL_VERSION_SERVING",
                )
            del self._versions[name][version]
            route.forget(version)
            _forget_memory(name, version)
            self._refresh(name)
            log.info("model %s: version %s unloaded", name, version)
            await self._stop_version(name, slot, drain=True)
            slot.status.state, slot.status.role, slot.status.traffic_percent = ModelState.UNLOADED, "", 0.0
            return slot.status

    # -- routing (pointer changes, no load) -------------------------------------------------------
    def promote(self, name: str, version: str = "") -> ModelStatus:
        """`version` (default: the candidate) becomes the serving version; the one it replaces stays
        loaded as the rollback target."""
        route = self._routes[self.model(name).name]
        target = version or route.candidate
        if not target:
            raise VersionStateError(
                f"model '{name}' has no candidate version to promote: name one", reason="NO_CANDIDATE_VERSION"
            )
        self._version(name, target)
        route.promote(target)
        self._refresh(name)
        log.info("model %s: version %s promoted (previous: %s)", name, target, route.previous or "none")
        return self._status[name]

    def rollback(self, name: str) -> ModelStatus:
        """The previous serving version serves again: a pointer swap, nothing loads."""
        route = self._routes[self.model(name).name]
        if not route.previous or route.previous not in self._versions.get(name, {}):
            raise VersionStateError(
                f"model '{name}' has no previous version loaded to roll back to", reason="NO_PREVIOUS_VERSION"
            )
        route.serving, route.previous = route.previous, route.serving
        self._refresh(name)
        log.info("model %s: rolled back to version %s (from %s)", name, route.serving, route.previous)
        return self._status[name]

    def set_routing(
        self,
        name: str,
        *,
        candidate: str,
        canary_percent: float,
        shadow_percent: float,
        policy: VersionPolicy | None = None,
    ) -> list[ModelStatus]:
        """Name the candidate version and its canary and shadow shares ("" and 0: none); `policy`: what
        a later plain load does. Returns every loaded version of the model."""
        model = self.model(name)
        canary_percent = check_percent("canary_percent", canary_percent)
        shadow_percent = check_percent("shadow_percent", shadow_percent)
        route = self._routes[name]
        if candidate:
            self._version(name, candidate)
            if candidate == route.serving:
                raise VersionStateError(
                    f"model '{name}' version {candidate} already serves: a candidate is another loaded version",
                    reason="CANDIDATE_IS_SERVING",
                )
        elif canary_percent or shadow_percent:
            raise InvalidInputError("a canary or shadow share needs a candidate_version", reason="NO_CANDIDATE_VERSION")
        if shadow_percent and not model.compares_outputs():
            raise InvalidInputError(
                f"model '{name}' cannot compare two versions' outputs, so it cannot shadow a candidate",
                reason="SHADOW_NOT_SUPPORTED",
            )
        route.set_candidate(candidate, canary_percent, shadow_percent)
        if policy is not None:
            route.policy = policy
        self._refresh(name)
        log.info(
            "model %s: candidate=%s canary=%.2f%% shadow=%.2f%% policy=%s",
            name,
            candidate or "none",
            canary_percent,
            shadow_percent,
            route.policy.value,
        )
        return [self._versions[name][v].status for v in self._versions.get(name, {})] or [self._status[name]]

    # -- requests ------------------------------------------------------------------------------
    def _dispatch(self, name: str, pinned: str, priority: Priority = Priority.ROUTINE) -> Dispatch | None:
        """Choose the version for one request and announce it to that version's batcher; None when
        nothing serves the model (`predict` then says why)."""
        if pinned:
            return Dispatch(pinned, "pinned", self._version(name, pinned).batcher.expect(priority))
        serving = self._serving_version(name)
        if serving is None:
            return None
        version, how, shadow = self._routes[name].pick()
        slot = self._versions[name].get(version, serving)
        return Dispatch(slot.status.version, how, slot.batcher.expect(priority), shadow)

    @contextlib.contextmanager
    def expect(
        self,
        names: Sequence[str],
        versions: Mapping[str, str] | None = None,
        *,
        priority: Priority = Priority.ROUTINE,
    ) -> Iterator[dict[str, Dispatch]]:
        """Announce a request for these models as it arrives, before decoding, and choose the version of
        each (`versions`: the ones the request pins; NOT_FOUND for one not loaded; `priority`: which lane
        of the batcher it waits in); pass each model's Dispatch to `predict`. A batch then waits only for
        requests that exist, and an overloaded
        model refuses the request here, before the decode (batcher.py)."""
        dispatches: dict[str, Dispatch] = {}
        try:
            for n in names:  # a model that sheds here withdraws the announcements made before it
                self.model(n)
                d = self._dispatch(n, (versions or {}).get(n, ""), priority)
                if d is not None:
                    dispatches[n] = d
            yield dispatches
        finally:
            for d in dispatches.values():
                d.done()

    async def predict(self, name: str, item: Any, dispatch: Dispatch | None = None, urgency: Urgency = ROUTINE) -> Any:
        """Queue one preprocessed input for the next batch of the version `dispatch` chose (from
        `expect`, which withdraws it if this raises before submitting; None: choose now). An unpinned
        request whose version was replaced meanwhile goes to the serving one; `dispatch.version` and
        `dispatch.status` then say which version answered. `urgency`: its priority and deadline."""
        self.model(name)
        if dispatch is None:
            dispatch = self._dispatch(name, "", urgency.priority)
            if dispatch is None:
                raise self._not_ready(name)
        slot = self._versions.get(name, {}).get(dispatch.version) or self._retiring.get((name, dispatch.version))
        if slot is not None and slot.batcher.closed:
            slot = None
        if slot is None:
            if dispatch.pinned:
                dispatch.done()
                raise ModelNotReadyError(
                    f"model '{name}' version {dispatch.version} was unloaded", metadata={"model": name}
                )
            slot = self._serving_version(name)
            if slot is None:
                dispatch.done()
                raise self._not_ready(name)
            dispatch.version, dispatch.shadow, dispatch.route = slot.status.version, "", "serving"
        dispatch.status = slot.status
        started = time.perf_counter()
        out = await slot.batcher.submit(item, dispatch.arrival, urgency)
        VERSION_REQUESTS.labels(name, dispatch.version, dispatch.route).inc()
        VERSION_DURATION.labels(name, dispatch.version).observe(time.perf_counter() - started)
        if dispatch.shadow:
            self._shadow(name, dispatch.shadow, item, out)
        return out

    def _not_ready(self, name: str) -> ModelNotReadyError:
        st = self._status[name]
        detail = f": {st.error}" if st.error else ""
        return ModelNotReadyError(f"model '{name}' is {st.state.value}{detail}", metadata={"model": name})

    def _shadow(self, name: str, version: str, item: Any, served: Any) -> None:
        """Run `item` on the candidate in the background and record how its output differs from the
        served one; dropped (and counted) when the candidate already has its share of shadow work or a
        full batch waiting."""
        slot = self._versions.get(name, {}).get(version)
        if slot is None:
            return
        busy = slot.batcher.queue_depth >= slot.batcher.max_batch_size
        if busy or slot.shadow_in_flight >= self.shadow_max_in_flight:
            SHADOW_DROPPED.labels(name, version).inc()
            return
        model = self._models[name]
        slot.shadow_in_flight += 1

        async def run() -> None:
            try:
                out = await slot.batcher.submit(model.shadow_input(item))
                diff = model.disagreement(served, out) or {}
            except Exception as exc:  # the candidate's failure never reaches a caller
                SHADOW_DROPPED.labels(name, version).inc()
                log.warning("model %s: shadow run on version %s failed: %s", name, version, exc)
                return
            finally:
                slot.shadow_in_flight -= 1
            SHADOW_REQUESTS.labels(name, version).inc()
            for label, (delta, flipped) in diff.items():
                SHADOW_DELTA.labels(name, version, label).observe(delta)
                if flipped:
                    SHADOW_FLIPS.labels(name, version, label).inc()
                else:  # the series exists from the first comparison, so a flip rate of 0 is visible
                    SHADOW_FLIPS.labels(name, version, label).inc(0)

        task = asyncio.ensure_future(run())
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

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

    async def _retire(
        self, name: str, batcher: DynamicBatcher[Any, Any], instance: ServedModel | None, drain: bool
    ) -> None:
        """Close a batcher (with `drain`, its queued callers are run first), wait for its running
        forwards, then free its weights."""
        grace = self._batching.drain_grace_s
        if not await batcher.close(grace, drain=drain):
            log.warning("model %s: a forward still runs after the %.0fs drain grace; freeing anyway", name, grace)
        if instance is not None:
            await asyncio.to_thread(instance.unload)

    async def _stop_version(self, name: str, slot: _Version, exclude: object = None, drain: bool = False) -> None:
        """Close one version's batcher and free its instance (unless it is `exclude`, which serves on),
        then stop its processes. `drain`: the version receives no new traffic, and the requests
        already sent to it (queued, or announced and still decoding) are answered by it first."""
        key = (name, slot.status.version)
        if drain:
            self._retiring[key] = slot
        try:
            await self._retire(name, slot.batcher, slot.instance if slot.instance is not exclude else None, drain)
        finally:  # even when the drain is cancelled, the processes stop
            if self._retiring.get(key) is slot:
                del self._retiring[key]
            if slot.status.version not in self._versions.get(name, {}):  # not reloaded as the same version
                _forget_version_series(name, slot.status.version)
            if slot.processes is not None:
                await asyncio.to_thread(slot.processes.close)

    async def _stop_all(self, name: str) -> None:
        """Stop every version of the model; the routing keeps only its policy."""
        versions = self._versions.pop(name, {})
        route = self._routes[name]
        self._routes[name] = VersionRoute(policy=route.policy)
        for version in versions:
            _forget_memory(name, version)
        await asyncio.gather(*(self._stop_version(name, v) for v in versions.values()))

    async def close(self) -> None:
        """Stop every model at once (one drain grace for all, not one each); a load or unload still
        running is cancelled first and releases what it built."""
        for task in list(self._admin_tasks) + list(self._shadow_tasks):
            task.cancel()
        await asyncio.gather(*self._admin_tasks, *self._shadow_tasks, return_exceptions=True)
        await asyncio.gather(*(self._stop_all(n) for n in list(self._versions)))


async def _free(instance: ServedModel | ProcessInstances) -> None:
    """Release an instance (or its processes) that never served."""
    if isinstance(instance, ProcessInstances):
        await asyncio.to_thread(instance.close)
    else:
        await asyncio.to_thread(instance.unload)


def _forget_memory(name: str, version: str) -> None:
    """Drop a version's memory series, whatever devices it reported."""
    MODEL_MEMORY.remove_by_labels({"model": name, "version": version})


def _forget_version_series(name: str, version: str) -> None:
    """Drop a version's request and shadow series once it answered its last request, as its memory series."""
    for metric in (VERSION_REQUESTS, VERSION_DURATION, SHADOW_REQUESTS, SHADOW_DROPPED, SHADOW_DELTA, SHADOW_FLIPS):
        metric.remove_by_labels({"model": name, "version": version})


def _gpu_allocated() -> int:
    """torch.cuda.memory_allocated over every device (0 without CUDA; torch is never imported for it)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return 0
    return int(sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())))


async def _in_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """`fn(*args)` on a thread of its own that ends with it (a load's torch threads end too: `handoff.
    start_on_new_thread`); a cancellation first waits for the thread (which cannot be stopped), so the
    caller's cleanup sees everything it built."""
    fut = start_on_new_thread(fn, *args, name="model-load")
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
