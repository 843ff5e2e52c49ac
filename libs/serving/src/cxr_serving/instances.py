"""Model instances in worker processes (`server_config.model_instance_mode: process`).

On CPU, forward threads in one process wait for each other's GIL, so each instance may run in its own
process instead, as Triton's Python backend and LitServe's workers do. Wire format, errors and
restarts: docs/serving-runtime.md.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import multiprocessing.connection
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_serving.errors import CxrError, ModelNotReadyError
from cxr_serving.heap import freeze_startup_heap, serve_this_process
from cxr_serving.logging_setup import setup_logging
from cxr_serving.metrics import MODEL_INSTANCE_RESTARTS

log = logging.getLogger(__name__)

ModelFactory = Callable[[], Any]  # -> ServedModel; must be picklable (a module-level function or partial)


@dataclass(frozen=True)
class LoadedModel:
    """What a loaded instance reports back: the fields of ModelStatus a load sets."""

    version: str
    untrained: bool
    device: str
    architecture: str
    labels: tuple[str, ...]
    precision: str = "float32"
    checkpoint: str = ""
    preprocessing: tuple[tuple[str, str], ...] = ()
    memory: tuple[tuple[str, int], ...] = ()  # parameter and buffer bytes by device type
    backend: str = "torch"
    runtime_note: str = ""
    runtime_report: Any = None  # runtimes.prepare.RuntimeReport: the parent publishes the instance's metrics

    @classmethod
    def of(cls, model: Any) -> LoadedModel:
        labels = tuple(model.labels)
        path = model.checkpoint
        return cls(
            model.version,
            model.untrained,
            model.device,
            model.architecture,
            labels,
            model.precision,
            str(path) if path is not None else "",
            tuple(model.preprocessing.items()),
            tuple(sorted(model.memory_bytes().items())),
            model.backend,
            model.runtime_note,
            getattr(model, "runtime_report", None),
        )


# --- wire ------------------------------------------------------------------------------------


def _tensor_from_array(array: Any) -> Any:
    import torch

    return torch.from_numpy(array)


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")  # never import torch just to send a message
        if torch is not None and isinstance(obj, torch.Tensor):
            if obj.device.type == "cpu" and obj.layout == torch.strided and obj.dtype != torch.bfloat16:
                return _tensor_from_array, (obj.detach().contiguous().numpy(),)
        return NotImplemented


def send(conn: multiprocessing.connection.Connection, obj: Any) -> None:
    """Pickle `obj` with its arrays out of band: a header, the pickle, then each raw buffer."""
    buffers: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    _Pickler(out, protocol=5, buffer_callback=buffers.append).dump(obj)
    raws = [b.raw() for b in buffers]
    conn.send_bytes(pickle.dumps([r.nbytes for r in raws]))
    conn.send_bytes(out.getbuffer())
    for r in raws:
        conn.send_bytes(r)


def recv(conn: multiprocessing.connection.Connection) -> Any:
    sizes: list[int] = pickle.loads(conn.recv_bytes())  # noqa: S301 - our own worker, over a private pipe
    payload = conn.recv_bytes()
    buffers = []
    for n in sizes:
        buf = bytearray(n)  # writable: arrays and tensors built on it may be written to
        if n:
            conn.recv_bytes_into(buf)
        else:
            conn.recv_bytes()
        buffers.append(buf)
    return pickle.loads(payload, buffers=buffers)  # noqa: S301


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a CxrError (INTERNAL) that names it."""
    try:
        pickle.loads(pickle.dumps(exc))  # noqa: S301 - round trip of our own object
        return exc
    except Exception:
        return CxrError(f"{type(exc).__name__}: {exc}")


# --- worker process ----------------------------------------------------------------------------


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which stops us
    try:
        sys_path, log_level, name = recv(conn)
        sys.path[:] = sys_path  # the factory may live anywhere the parent can import from
        setup_logging(name, log_level)  # JSON lines, like the server's
        factory: ModelFactory = recv(conn)
    except (EOFError, OSError):
        return
    except BaseException as exc:  # an unimportable factory: reported on the first request
        factory = _raiser(exc)
    model: Any = None
    build_error: BaseException | None = None
    try:
        model = factory()
    except BaseException as exc:  # reported on the first request, so the parent sees why
        build_error = exc
    serve_this_process()
    freeze_startup_heap()  # before the weights load, as the server does: a collection mid-batch walks less
    while True:
        try:
            op, arg = recv(conn)
        except (EOFError, OSError):
            return  # the parent is gone
        if op == "stop":
            return
        try:
            if build_error is not None:
                raise build_error
            if op == "load":
                path, thresholds = arg
                if thresholds is None:
                    model.load(path)
                else:
                    model.load_with(path, thresholds)
                reply: Any = LoadedModel.of(model)
            elif op == "predict":
                reply = list(model.predict(arg))
            else:
                raise CxrError(f"unknown instance request {op!r}")
            send(conn, ("ok", reply))
        except BaseException as exc:
            try:
                send(conn, ("error", _portable(exc)))
            except (EOFError, OSError):
                return


def _raiser(exc: BaseException) -> ModelFactory:
    def build() -> Any:
        raise exc

    return build


# --- parent side -------------------------------------------------------------------------------


class _Instance:
    def __init__(self, index: int, process: subprocess.Popen[bytes], conn: multiprocessing.connection.Connection):
        self.index = index
        self.process = process
        self.conn = conn

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def exitcode(self) -> int | None:
        return self.process.poll()

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def join(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)


class InstanceDiedError(ModelNotReadyError):
    reason = "MODEL_INSTANCE_DIED"


class ProcessInstances:
    """`count` processes, each with its own copy of one model; `predict` runs a batch on an idle one."""

    def __init__(
        self,
        name: str,
        factory: ModelFactory,
        count: int,
        *,
        log_level: str | None = None,
        load_timeout_s: float = 900.0,
    ) -> None:
        if count < 1:
            raise ValueError("count must be >= 1")
        self.name = name
        self.count = count
        self._factory = factory
        self._log_level = log_level or logging.getLevelName(logging.getLogger().getEffectiveLevel())
        self._load_timeout_s = load_timeout_s
        self._idle: queue.Queue[_Instance] = queue.Queue()
        self._instances: dict[int, _Instance] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._checkpoint: Path | None = None
        self._thresholds: Any = None  # the ThresholdOverride of the last start, applied again on a restart
        self._restarting = 0

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [i.pid for i in self._instances.values()]

    @property
    def live(self) -> int:
        with self._lock:
            return len(self._instances)

    def _spawn(self, index: int) -> _Instance:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            process = subprocess.Popen(
                [sys.executable, "-m", "cxr_serving.instances", str(theirs.fileno())], pass_fds=[theirs.fileno()]
            )
            conn = multiprocessing.connection.Connection(ours.detach())
        # only the worker holds its end now: its death reads as EOF here
        inst = _Instance(index, process, conn)
        try:
            send(conn, (list(sys.path), self._log_level, f"cxr-{self.name}-{index}"))
            send(conn, self._factory)
        except (EOFError, OSError):
            pass  # it died at once: the first request reports it
        return inst

    def _call(self, inst: _Instance, op: str, arg: Any) -> Any:
        """Send one request and wait for its reply; raises the model's error or InstanceDiedError."""
        try:
            send(inst.conn, (op, arg))
        except OSError:
            pass  # a dead worker: the reply below reads as EOF and says so
        return self._reply(inst, op)

    def _reply(self, inst: _Instance, op: str, timeout_s: float | None = None) -> Any:
        """The worker's answer to `op`: its value, or its error raised here; InstanceDiedError when it
        died (EOF: only it held the other end of the socket) or gave no answer in `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while deadline is not None and not inst.conn.poll(1.0):
                if not inst.is_alive():
                    raise EOFError
                if time.monotonic() > deadline:
                    raise InstanceDiedError(
                        f"model '{self.name}' instance {inst.index} gave no answer to {op} in {timeout_s:.0f}s"
                    )
            status, value = recv(inst.conn)
        except (EOFError, OSError):
            inst.join(2)
            raise InstanceDiedError(
                f"model '{self.name}' instance {inst.index} (pid {inst.pid}) died during {op} "
                f"(exit code {inst.exitcode})",
                metadata={"model": self.name},
            ) from None
        if status == "error":
            raise value
        return value

    def start(self, checkpoint_path: Path | None = None, thresholds: Any = None) -> LoadedModel:
        """Start every instance and load the model in each (in parallel); all or nothing. `thresholds`:
        a ThresholdOverride (lifecycle.py) for the model's `load_with`."""
        self._checkpoint, self._thresholds = checkpoint_path, thresholds
        started: list[_Instance] = []
        try:  # a spawn that fails (fork, fds) stops the processes spawned before it
            for i in range(self.count):
                started.append(self._spawn(i))
            for inst in started:
                send(inst.conn, ("load", (checkpoint_path, thresholds)))
            infos = [self._wait_loaded(inst) for inst in started]
        except BaseException:
            for inst in started:
                self._kill(inst)
            raise
        with self._lock:
            for inst in started:
                self._instances[inst.index] = inst
                self._idle.put(inst)
        log.info("model %s: %d instance processes ready (pids %s)", self.name, self.count, self.pids)
        if infos[0].runtime_report is not None:  # set in the instances' registries: publish them here
            infos[0].runtime_report.publish()
        return infos[0]

    def _wait_loaded(self, inst: _Instance) -> LoadedModel:
        value = self._reply(inst, "load", self._load_timeout_s)
        assert isinstance(value, LoadedModel)
        return value

    def predict(self, batch: list[Any]) -> Sequence[Any]:
        """Run one batch on an idle instance (blocks this thread until one is free)."""
        inst = self._borrow()
        try:
            result = self._call(inst, "predict", batch)
        except InstanceDiedError:
            self._replace(inst)
            raise
        except BaseException:
            self._idle.put(inst)
            raise
        self._idle.put(inst)
        return result  # type: ignore[no-any-return]

    def _borrow(self) -> _Instance:
        while True:
            if self._closed:
                raise ModelNotReadyError(f"model '{self.name}' is shutting down")
            try:
                return self._idle.get(timeout=0.5)
            except queue.Empty:
                pass
            with self._lock:
                gone = not self._instances and self._restarting == 0
            if gone:
                raise ModelNotReadyError(
                    f"model '{self.name}' has no running instance (every restart failed); load it again",
                    metadata={"model": self.name},
                )

    def _replace(self, dead: _Instance) -> None:
        """Forget a dead instance and start a new one in the background."""
        with self._lock:
            self._instances.pop(dead.index, None)
            if self._closed:
                return
            self._restarting += 1
        log.error("model %s instance %d died (exit code %s); restarting it", self.name, dead.index, dead.exitcode)
        MODEL_INSTANCE_RESTARTS.labels(self.name).inc()
        threading.Thread(target=self._restart, args=(dead.index,), name=f"restart-{self.name}", daemon=True).start()

    def _restart(self, index: int) -> None:
        inst: _Instance | None = None
        try:
            inst = self._spawn(index)
            send(inst.conn, ("load", (self._checkpoint, self._thresholds)))
            self._wait_loaded(inst)
        except BaseException as exc:
            log.error("model %s instance %d failed to restart: %s", self.name, index, exc)
            if inst is not None:
                self._kill(inst)
            with self._lock:
                self._restarting -= 1
            return
        with self._lock:
            self._restarting -= 1
            if self._closed:
                closed = True
            else:
                closed = False
                self._instances[index] = inst
        if closed:
            self._stop(inst)
            return
        self._idle.put(inst)
        log.info("model %s instance %d restarted (pid %s)", self.name, index, inst.pid)

    def _stop(self, inst: _Instance, grace_s: float = 5.0) -> None:
        with contextlib.suppress(EOFError, OSError):
            send(inst.conn, ("stop", None))
        inst.join(grace_s)
        self._kill(inst)

    @staticmethod
    def _kill(inst: _Instance) -> None:
        if inst.is_alive():
            inst.process.terminate()
            inst.join(5)
        if inst.is_alive():
            inst.process.kill()
            inst.join(5)
        inst.conn.close()

    def close(self) -> None:
        """Stop every instance: each finishes the batch it runs, then exits (killed after a grace)."""
        with self._lock:
            self._closed = True
            instances = list(self._instances.values())
            self._instances.clear()
        for inst in instances:
            self._stop(inst)


if __name__ == "__main__":  # an instance process: python -m cxr_serving.instances FD
    # Run the imported module's copy, so what it pickles (LoadedModel) names cxr_serving.instances.
    from cxr_serving import instances

    instances._worker_main(multiprocessing.connection.Connection(int(sys.argv[1])))
