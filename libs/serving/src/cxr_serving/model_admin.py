"""The model-admin RPCs of every service (ListModels, LoadModel, UnloadModel, GetModelCard,
RecordModelEvaluation): one implementation, one checkpoint-path rule; model cards: model_card.py.

A client names a checkpoint by a path on the server, so the path is the attack surface: it is
resolved with symlinks followed (relative paths start at `models_path`) and must lie under
`models_path`, and so must the weights file a directory expands to (checkpoint_files.py);
anything else, or any explicit path while no `models_path` is configured, is refused with
PERMISSION_DENIED (`CHECKPOINT_PATH_OUTSIDE`), and a string that is no path (a NUL byte) with
INVALID_ARGUMENT (`CHECKPOINT_PATH_INVALID`). A loader reports a bad file as a CheckpointError
(FAILED_PRECONDITION); running out of memory is RESOURCE_EXHAUSTED; any other exception is a bug
and reaches the caller as INTERNAL. Servicers map protos to these calls and nothing more; the
repository does the validate-then-swap (lifecycle.py).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cxr_protos.common.v1 import common_pb2
from cxr_serving.checkpoint_files import client_checkpoint, out_of_memory
from cxr_serving.errors import CheckpointError, CxrError, InvalidInputError, ModelNotReadyError, OverloadedError
from cxr_serving.lifecycle import ModelRepository, ModelState, ModelStatus, ThresholdOverride
from cxr_serving.model_card import (
    IN_MEMORY,
    build_card,
    card_file,
    card_reference,
    evaluation_dict,
    read_card_file,
    write_card_file,
)
from cxr_serving.proto_convert import fill_model_info
from cxr_serving.versions import VersionPolicy, split_name

_POLICIES: dict[int, VersionPolicy] = {
    common_pb2.VERSION_POLICY_LATEST: VersionPolicy.LATEST,
    common_pb2.VERSION_POLICY_PINNED: VersionPolicy.PINNED,
}


class ModelAdmin:
    """The model-admin RPCs of one service, on its repository."""

    def __init__(
        self,
        repo: ModelRepository,
        models_path: Path | None,
        *,
        default_model: str | None = None,
        rest_prefix: str = "",
    ) -> None:
        self.repo = repo
        self.models_path = models_path
        self.default_model = default_model
        self.rest_prefix = rest_prefix  # e.g. "/v1/classification": ModelInfo.model_card links to its card there
        self._untrained_cards: dict[str, dict[str, Any]] = {}  # name -> the in-memory card of an untrained model
        self._card_lock = asyncio.Lock()  # one evaluation record at a time (read-modify-write of a card file)

    def info(self, status: ModelStatus) -> common_pb2.ModelInfo:
        """ModelInfo with the link to the card of its version (every response that names a model carries it):
        always `name@version`, so that a link copied into a report keeps naming the version that answered
        after another one is promoted (the plain `name` route stays the serving version's)."""
        return self.fill_info(common_pb2.ModelInfo(), status)

    def fill_info(self, info: common_pb2.ModelInfo, status: ModelStatus) -> common_pb2.ModelInfo:
        """`info` as above, written into a field of a response."""
        fill_model_info(info, status)
        if self.rest_prefix:
            key = f"{status.name}@{status.version}" if status.version else status.name
            info.model_card = f"{self.rest_prefix}/models/{key}/card"
        return info

    def _name(self, raw: str) -> str:
        name = raw or self.default_model or ""
        self.repo.model(name)  # NOT_FOUND names the known models
        return name

    def _name_version(self, raw: str) -> tuple[str, str]:
        """`name` or `name@version` (the version checked by the caller)."""
        name, version = split_name(raw)
        return self._name(name), version

    def list_models(self) -> list[common_pb2.ModelInfo]:
        """Every loaded version of every model, with its role, share and memory; a model with no version
        loaded once, with its state."""
        return [self.info(s) for s in self.repo.version_statuses()]

    def _thresholds(self, name: str, values: Mapping[str, float], model_version: str) -> ThresholdOverride | None:
        """The request's thresholds, checked before anything loads: INVALID_ARGUMENT for a model without
        thresholds, an unknown label, a value outside (0, 1] or a missing model version."""
        if not values:
            if model_version:
                raise InvalidInputError("thresholds_model_version is set but no thresholds", reason="THRESHOLDS_EMPTY")
            return None
        model = self.repo.model(name)
        if not model.accepts_thresholds:
            raise InvalidInputError(
                f"model '{name}' has no decision thresholds to set", reason="THRESHOLDS_NOT_SUPPORTED"
            )
        unknown = sorted(set(values) - set(model.labels))
        if unknown:
            raise InvalidInputError(
                f"thresholds name labels {unknown} that model '{name}' does not output; its labels are "
                f"{list(model.labels)}",
                reason="THRESHOLDS_UNKNOWN_LABEL",
            )
        bad = sorted(label for label, t in values.items() if not (math.isfinite(t) and 0.0 < t <= 1.0))
        if bad:
            raise InvalidInputError(
                f"thresholds of {bad} are outside (0, 1]: a threshold of 0 makes a label positive on every image",
                reason="THRESHOLDS_OUT_OF_RANGE",
            )
        if not model_version:
            raise InvalidInputError(
                "thresholds_model_version is required with thresholds: the model version they were chosen for",
                reason="THRESHOLDS_VERSION_MISSING",
            )
        return ThresholdOverride(dict(values), model_version)

    async def load_model(
        self,
        name: str,
        checkpoint_path: str,
        thresholds: Mapping[str, float] | None = None,
        thresholds_model_version: str = "",
        *,
        side_by_side: bool = False,
    ) -> common_pb2.ModelInfo:
        """Load or reload, with `thresholds` (chosen for `thresholds_model_version`) replacing the
        configured ones (`side_by_side`: beside the serving version, which keeps serving); a refused
        checkpoint leaves a serving version serving, and the error names the file and the reason."""
        name = self._name(name)
        override = self._thresholds(name, thresholds or {}, thresholds_model_version)
        path = client_checkpoint(self.models_path, checkpoint_path)
        shown = str(path) if path is not None else "the configured checkpoint"
        try:
            status = await self.repo.load(name, path, override, side_by_side=side_by_side)
        except CheckpointError as exc:
            if path is not None and str(path) not in exc.message:
                raise CheckpointError(f"{shown}: {exc.message}", reason=exc.reason, metadata=exc.metadata) from exc
            raise
        except Exception as exc:  # a bad file is already a CheckpointError (loaders); anything else is INTERNAL
            if isinstance(exc, CxrError) or not out_of_memory(exc):
                raise
            raise OverloadedError(
                f"model '{name}' ran out of memory loading {shown} ({type(exc).__name__}); "
                "the served version, if any, keeps serving",
                reason="MODEL_LOAD_OUT_OF_MEMORY",
            ) from exc
        return self.info(status)

    async def unload_model(self, raw: str) -> common_pb2.ModelInfo:
        """Unload a model (every version), or one version that does not serve (`name@version`)."""
        name, version = self._name_version(raw)
        return self.info(await self.repo.unload(name, version))

    def promote(self, raw: str, version: str = "") -> common_pb2.ModelInfo:
        name, pinned = self._name_version(raw)
        return self.info(self.repo.promote(name, version or pinned))

    def rollback(self, raw: str) -> common_pb2.ModelInfo:
        return self.info(self.repo.rollback(self._name(raw)))

    def set_routing(
        self, raw: str, candidate: str, canary_percent: float, shadow_percent: float, policy: int
    ) -> list[common_pb2.ModelInfo]:
        statuses = self.repo.set_routing(
            self._name(raw),
            candidate=candidate,
            canary_percent=canary_percent,
            shadow_percent=shadow_percent,
            policy=_POLICIES.get(policy),
        )
        return [self.info(s) for s in statuses]

    def _serving(self, raw: str) -> ModelStatus:
        """The status of the version a card describes: the serving one, or `name@version`."""
        name, version = self._name_version(raw)
        if version:
            return self.repo.version_status(name, version)
        status = self.repo.status(name)
        if status.state is not ModelState.READY:
            raise ModelNotReadyError(
                f"model '{status.name}' is {status.state.value}: a card describes the version that serves",
                metadata={"model": status.name},
            )
        return status

    def _stored(self, status: ModelStatus) -> tuple[dict[str, Any], str]:
        """The card's stored part (declaration and recorded evaluation) and where it is kept."""
        if not status.checkpoint:
            return self._untrained_cards.get(status.name, {}), IN_MEMORY
        path = card_file(status.checkpoint)
        return read_card_file(path), card_reference(path, self.models_path)

    async def get_model_card(self, name: str) -> common_pb2.ModelCard:
        status = self._serving(name)
        stored, source = await asyncio.to_thread(self._stored, status)
        return build_card(status, stored, source)

    async def record_evaluation(self, name: str, evaluation: common_pb2.ModelEvaluation) -> common_pb2.ModelCard:
        """Attach `evaluation` to the card of the serving version; FAILED_PRECONDITION when it evaluated another."""
        status = self._serving(name)
        record = evaluation_dict(evaluation, status.labels)
        if evaluation.model_version != status.version:
            raise CheckpointError(
                f"model '{status.name}': the evaluation is of version {evaluation.model_version!r}, but version "
                f"{status.version!r} serves; its results are not recorded on this version's card",
                reason="EVALUATION_VERSION_MISMATCH",
            )
        async with self._card_lock:
            if not status.checkpoint:
                self._untrained_cards[status.name] = {"evaluation": record}
            else:
                path = card_file(status.checkpoint)

                def write() -> None:
                    stored = read_card_file(path)
                    stored["evaluation"] = record
                    write_card_file(path, stored)

                try:
                    await asyncio.to_thread(write)
                except OSError as exc:
                    shown, why = card_reference(path, self.models_path), exc.strerror or type(exc).__name__
                    raise CheckpointError(
                        f"cannot write model card {shown}: {why}", reason="MODEL_CARD_NOT_WRITABLE"
                    ) from exc
        return await self.get_model_card(name)


class ModelAdminRpcs:
    """The model-admin RPCs as servicer methods, mixed in before a service's generated base class, so
    no service writes them again; the servicer sets `admin` and `admin_messages` (its `_pb2` module)."""

    admin: ModelAdmin
    admin_messages: Any

    async def ListModels(self, request: Any, context: Any) -> Any:
        return self.admin_messages.ListModelsResponse(models=self.admin.list_models())

    async def LoadModel(self, request: Any, context: Any) -> Any:
        model = await self.admin.load_model(
            request.model_name,
            request.checkpoint_path,
            dict(request.thresholds),
            request.thresholds_model_version,
            side_by_side=request.side_by_side,
        )
        return self.admin_messages.LoadModelResponse(model=model)

    async def UnloadModel(self, request: Any, context: Any) -> Any:
        return self.admin_messages.UnloadModelResponse(model=await self.admin.unload_model(request.model_name))

    async def PromoteModel(self, request: Any, context: Any) -> Any:
        return self.admin_messages.PromoteModelResponse(model=self.admin.promote(request.model_name, request.version))

    async def RollbackModel(self, request: Any, context: Any) -> Any:
        return self.admin_messages.RollbackModelResponse(model=self.admin.rollback(request.model_name))

    async def SetModelRouting(self, request: Any, context: Any) -> Any:
        models = self.admin.set_routing(
            request.model_name,
            request.candidate_version,
            request.canary_percent,
            request.shadow_percent,
            request.version_policy,
        )
        return self.admin_messages.SetModelRoutingResponse(models=models)

    async def GetModelCard(self, request: Any, context: Any) -> Any:
        return self.admin_messages.GetModelCardResponse(card=await self.admin.get_model_card(request.model_name))

    async def RecordModelEvaluation(self, request: Any, context: Any) -> Any:
        card = await self.admin.record_evaluation(request.model_name, request.evaluation)
        return self.admin_messages.RecordModelEvaluationResponse(card=card)
