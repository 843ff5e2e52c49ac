"""A trivial model behind the real classification contract, to test the runtime before
any real model exists: probability = mean brightness of the decoded image."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_serving.binding import ModelEntry, bind_models, infer
from cxr_serving.errors import InvalidInputError
from cxr_serving.images import DecodePool
from cxr_serving.lifecycle import UNTRAINED, ModelRepository, ServedModel
from cxr_serving.model_admin import ModelAdmin, ModelAdminRpcs
from cxr_serving.proto_convert import image_metadata, model_info, urgency
from cxr_serving.server import ServiceBinding
from cxr_serving.settings import Settings

SERVICE = pb.DESCRIPTOR.services_by_name["ClassificationService"].full_name


class BrightnessModel(ServedModel):
    name = "toy"
    architecture = "mean-brightness"
    labels = ("bright",)

    def __init__(
        self,
        delay_s: float = 0.0,
        load_delay_s: float = 0.0,
        fail_load: bool = False,
        checkpoint_error: BaseException | None = None,
        gate_dir: Path | None = None,
    ) -> None:
        self.delay_s = delay_s
        self.gate_dir = gate_dir  # see ToyGate
        self.load_delay_s = load_delay_s
        self.fail_load = fail_load
        self.checkpoint_error = checkpoint_error  # raised by a load of an explicit checkpoint (LoadModel)
        self.batches: list[int] = []
        self._loaded = False

    def load(self, checkpoint_path: Path | None = None) -> None:
        report_gc_state()  # with env TOY_GC_REPORT_DIR: what the collector sees in the process that loads
        time.sleep(self.load_delay_s)
        if self.fail_load:
            raise RuntimeError("checkpoint corrupt")
        if checkpoint_path is not None and self.checkpoint_error is not None:
            raise self.checkpoint_error
        self._loaded = True

    def predict(self, batch: list[Any]) -> Sequence[Any]:
        self.batches.append(len(batch))
        if self.gate_dir is not None and len(self.batches) == 1:
            tmp = self.gate_dir / f".entered.{os.getpid()}.{threading.get_ident()}.tmp"
            tmp.write_text(str(len(batch)))
            tmp.replace(self.gate_dir / "entered")  # a reader never sees it half written
            deadline = time.monotonic() + 30
            while not (self.gate_dir / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        time.sleep(self.delay_s)
        return [float(np.mean(x)) for x in batch]

    @property
    def version(self) -> str:
        return UNTRAINED


class ToyGate:
    """Holds the toy model's first forward (env TOY_GATE_DIR=`dir`, or `gate_dir`): the forward writes its batch
    size to `entered`, then waits for `release` (30 s at most), so a test queues requests behind a forward that is
    known to run instead of sleeping and hoping. Files, not events: the model runs in a service process; in the
    test's own process `tests.support.gated_forward.GatedForward` does the same with events."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "toy-gate"
        self.dir.mkdir()

    def wait_entered(self, timeout: float = 30.0) -> int:
        """The first forward's batch size, once it runs."""
        deadline = time.monotonic() + timeout
        entered = self.dir / "entered"
        while not entered.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the toy model's first forward did not start")
            time.sleep(0.01)
        return int(entered.read_text())

    def release(self) -> None:
        (self.dir / "release").touch()


class ToyServicer(ModelAdminRpcs, pb_grpc.ClassificationServiceServicer):
    admin_messages = pb

    def __init__(self, repo: ModelRepository, pool: DecodePool, models_path: Path | None = None) -> None:
        self.repo = repo
        self.pool = pool
        self.admin = ModelAdmin(repo, models_path, default_model="toy")

    async def ClassifyImage(
        self, request: pb.ClassifyImageRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyImageResponse:
        if request.model_names and request.model_names[0] == "explode":
            raise RuntimeError("secret internal detail")
        if request.model_names and request.model_names[0] == "bad":
            raise InvalidInputError("model_names: 'bad' is not allowed")
        how_urgent = urgency(request.priority, context)
        with self.repo.expect(["toy"], priority=how_urgent.priority) as arrivals:
            img, p = await infer(
                self.repo,
                self.pool,
                "toy",
                request.image.data,
                request.image.content_type,
                arrivals.get("toy"),
                urgency=how_urgent,
            )
        st = self.repo.status("toy")
        pred = pb.ModelPrediction(
            model=model_info(st), findings=[pb.Finding(label="bright", probability=p, threshold=0.5, positive=p >= 0.5)]
        )
        return pb.ClassifyImageResponse(predictions=[pred], image=image_metadata(img), untrained=st.untrained)


def report_gc_state() -> None:
    """With env TOY_GC_REPORT_DIR, write `gc-<pid>.json` there: the collector's frozen count and whether an object
    made now is in its view (a process's first report is kept: a reload does not overwrite it)."""
    import gc
    import json
    import os

    report_dir = os.environ.get("TOY_GC_REPORT_DIR")
    if not report_dir or Path(report_dir, f"gc-{os.getpid()}.json").exists():
        return
    made_now = ["made after start-up", []]  # a list: always tracked by the collector
    seen = any(o is made_now for o in gc.get_objects())
    tmp = Path(report_dir, f".gc-{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"frozen": gc.get_freeze_count(), "later_in_view": seen}))
    tmp.replace(Path(report_dir, f"gc-{os.getpid()}.json"))  # a reader never sees half a report


def build_toy(settings: Settings, model: BrightnessModel | None = None) -> ServiceBinding:
    model = model or BrightnessModel()
    factory = functools.partial(
        BrightnessModel, model.delay_s, model.load_delay_s, model.fail_load, model.checkpoint_error, model.gate_dir
    )
    return bind_models(
        settings,
        name="classification",
        full_service_names=[SERVICE],
        models=[ModelEntry(model, factory=factory)],
        servicer=lambda repo, pool: ToyServicer(repo, pool, settings.models_path),
        register=pb_grpc.add_ClassificationServiceServicer_to_server,
    )


def build_toy_from_env(settings: Settings) -> ServiceBinding:
    """The toy binding with env TOY_DELAY_S as its forward time (module level: frontend processes rebuild it),
    and env TOY_GATE_DIR as its first forward's gate (`ToyGate`). With env TOY_GC_REPORT_DIR, every process
    reports its collector's view once started (`report_gc_state`; a process that loads the model reports at
    the load)."""
    import dataclasses
    import os

    gate = os.environ.get("TOY_GATE_DIR")
    model = BrightnessModel(delay_s=float(os.environ.get("TOY_DELAY_S", "0")), gate_dir=Path(gate) if gate else None)
    binding = build_toy(settings, model)
    if not os.environ.get("TOY_GC_REPORT_DIR"):
        return binding

    async def on_start() -> None:
        report_gc_state()

    return dataclasses.replace(binding, on_start=on_start)


def main() -> None:
    """Run the toy service as a process (for SIGTERM tests): env TOY_DELAY_S sets the forward time."""
    from cxr_serving.cli import run_service
    from tests.support.toy_service import build_toy_from_env as build  # by module name, not __main__: picklable

    raise SystemExit(run_service("classification", build))


if __name__ == "__main__":
    main()
