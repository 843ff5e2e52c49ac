"""One image through the selected classifiers, with no gRPC: the domain half of the servicer.

Decode + each model's `preprocess`, once per distinct preprocessing spec (one job on the bounded
worker pool, off the event loop) -> every selected model through its dynamic batcher concurrently
-> each model's `postprocess` (findings with their thresholds), with the time of each step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cxr_classification.model import ChestXrayClassifier, ClassifierInput, ClassifierOutput, FindingResult
from cxr_classification.preprocessing import PreprocessSpec
from cxr_serving.errors import InvalidInputError, ModelNotReadyError
from cxr_serving.images import DecodedImage, DecodePool, decode_image
from cxr_serving.lifecycle import Dispatch, ModelRepository, ModelStatus
from cxr_serving.urgency import ROUTINE, Urgency
from cxr_serving.versions import split_name

MAX_HEATMAPS_PER_REQUEST = 16  # Grad-CAM costs a backward pass each, on the model's thread


@dataclass(frozen=True)
class ModelResult:
    """One model's findings for one image and the time it took (its batch wait plus the forward)."""

    name: str
    findings: list[FindingResult]
    seconds: float
    status: ModelStatus  # the version that answered


@dataclass(frozen=True)
class Classification:
    """Every selected model's result for one image, the decoded image, and the time of each step."""

    image: DecodedImage
    results: list[ModelResult]
    decode_s: float
    preprocess_s: float
    inference_s: float
    total_s: float


class Classifiers:
    """The configured classifiers of one service, on its repository and decode pool."""

    def __init__(self, repo: ModelRepository, models: dict[str, ChestXrayClassifier], pool: DecodePool) -> None:
        self.repo = repo
        self.models = models
        self.pool = pool

    def select(self, requested: Sequence[str], model_version: str = "") -> tuple[list[str], dict[str, str]]:
        """The models named (NOT_FOUND for an unknown one), or every ready model, and the versions the
        request pins: `name@version` entries, or `model_version` for a request that selects one model."""
        pins: dict[str, str] = {}
        names: list[str] = []
        for raw in requested:
            name, version = split_name(raw)
            self.repo.model(name)
            if version:
                if pins.get(name, version) != version:
                    raise InvalidInputError(
                        f"model_names pins two versions of '{name}'", reason="MODEL_VERSION_CONFLICT"
                    )
                pins[name] = version
            if name not in names:
                names.append(name)
        if not names:
            names = [n for n in self.repo.names if self.repo.is_ready(n)]
            if not names:
                raise ModelNotReadyError("no classification model is loaded; see ListModels")
        if model_version:
            if len(names) != 1:
                raise InvalidInputError(
                    f"model_version pins one model's version, but the request selects {names}: name one model "
                    "in model_names, or pin each as name@version",
                    reason="MODEL_VERSION_NEEDS_ONE_MODEL",
                )
            if pins.get(names[0], model_version) != model_version:
                raise InvalidInputError(
                    f"model_version {model_version!r} contradicts {names[0]}@{pins[names[0]]}",
                    reason="MODEL_VERSION_CONFLICT",
                )
            pins[names[0]] = model_version
        return names, pins

    def heatmaps_by_model(self, names: list[str], labels: Sequence[str], images: int = 1) -> dict[str, tuple[str, ...]]:
        wanted = list(dict.fromkeys(labels))
        if len(wanted) * images > MAX_HEATMAPS_PER_REQUEST:
            raise InvalidInputError(
                f"{len(wanted)} heatmap labels x {images} images is over the limit of {MAX_HEATMAPS_PER_REQUEST} "
                "heatmaps per request: ask for fewer labels or send fewer images per call",
                reason="TOO_MANY_HEATMAPS",
            )
        known = {label for n in names for label in self.models[n].labels}
        unknown = [label for label in wanted if label not in known]
        if unknown:
            raise InvalidInputError(
                f"heatmap_labels {unknown} are not outputs of the selected models; known labels: {sorted(known)}",
                reason="UNKNOWN_LABEL",
            )
        return {n: tuple(label for label in wanted if label in self.models[n].labels) for n in names}

    def _preprocess_all(self, decoded: DecodedImage, names: list[str]) -> dict[PreprocessSpec, torch.Tensor]:
        out: dict[PreprocessSpec, torch.Tensor] = {}
        for name in names:
            model = self.models[name]
            if model.spec not in out:
                out[model.spec] = model.preprocess(decoded)
        return out

    def _decode_and_preprocess(
        self, data: bytes, content_type: str, names: list[str]
    ) -> tuple[DecodedImage, dict[PreprocessSpec, torch.Tensor], float, float]:
        """One job on the worker pool: validate + decode, then every distinct preprocessing."""
        t0 = time.perf_counter()
        decoded = decode_image(data, content_type, self.pool.limits)
        t1 = time.perf_counter()
        tensors = self._preprocess_all(decoded, names)
        return decoded, tensors, t1 - t0, time.perf_counter() - t1

    async def _predict(
        self, name: str, item: ClassifierInput, dispatch: Dispatch | None = None, urgency: Urgency = ROUTINE
    ) -> tuple[ClassifierOutput, float, ModelStatus]:
        started = time.perf_counter()
        dispatch = dispatch or Dispatch("", "serving")
        out: ClassifierOutput = await self.repo.predict(name, item, dispatch, urgency)
        assert dispatch.status is not None
        return out, time.perf_counter() - started, dispatch.status

    async def classify(
        self,
        data: bytes,
        content_type: str,
        names: list[str],
        heatmaps: dict[str, tuple[str, ...]],
        versions: dict[str, str] | None = None,
        urgency: Urgency = ROUTINE,
    ) -> Classification:
        """`versions`: the versions the request pins; `urgency`: its priority and deadline, which every
        model's batcher honours."""
        t0 = time.perf_counter()
        # each model's batcher waits for this one while it decodes; the version of each is chosen here
        with self.repo.expect(names, versions, priority=urgency.priority) as arrivals:
            decoded, tensors, decode_s, preprocess_s = await self.pool.run(
                self._decode_and_preprocess, data, content_type, names
            )
            t1 = time.perf_counter()
            items = [(n, ClassifierInput(tensors[self.models[n].spec], heatmaps.get(n, ()))) for n in names]
            if len(items) == 1:
                outs = [await self._predict(*items[0], arrivals.get(items[0][0]), urgency)]
            else:
                outs = list(
                    await asyncio.gather(*(self._predict(n, item, arrivals.get(n), urgency) for n, item in items))
                )
        t2 = time.perf_counter()
        results = [
            ModelResult(n, self.models[n].postprocess(out), secs, status)
            for n, (out, secs, status) in zip(names, outs, strict=True)
        ]
        return Classification(decoded, results, decode_s, preprocess_s, t2 - t1, t2 - t0)
