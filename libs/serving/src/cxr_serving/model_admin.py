"""ListModels / LoadModel / UnloadModel for every service: one implementation, one checkpoint-path rule.

A client names a checkpoint by a path on the server, so the path is the attack surface: it is
resolved with symlinks followed (relative paths start at `models_path`) and must lie under
`models_path`; anything else, or any explicit path while no `models_path` is configured, is
refused with PERMISSION_DENIED (`CHECKPOINT_PATH_OUTSIDE`). Servicers map protos to these calls
and nothing more; the repository does the validate-then-swap (lifecycle.py).
"""

from __future__ import annotations

from pathlib import Path

from cxr_protos.common.v1 import common_pb2
from cxr_serving.errors import CheckpointError, CheckpointPathError, CxrError
from cxr_serving.lifecycle import ModelRepository
from cxr_serving.proto_convert import model_info


def checkpoint_under(models_path: Path | None, raw: str) -> Path | None:
    """The checkpoint a client asked for, resolved; None for "the configured one" (empty `raw`)."""
    if not raw:
        return None
    if models_path is None:
        raise CheckpointPathError(
            "LoadModel with a checkpoint_path needs models_path (CXR_MODELS_PATH) to be set on the server: "
            "only checkpoints under it may be loaded; leave checkpoint_path empty to reload the configured one"
        )
    base = models_path.resolve()
    path = Path(raw)
    resolved = (path if path.is_absolute() else base / path).resolve()
    if not resolved.is_relative_to(base):
        raise CheckpointPathError(
            f"checkpoint_path {raw!r} resolves to a file outside models_path ({models_path}); "
            "put the checkpoint under models_path and name it relative to it",
            metadata={"checkpoint_path": raw},
        )
    return resolved


class ModelAdmin:
    """The model-admin RPCs of one service, on its repository."""

    def __init__(self, repo: ModelRepository, models_path: Path | None, *, default_model: str | None = None) -> None:
        self.repo = repo
        self.models_path = models_path
        self.default_model = default_model

    def _name(self, raw: str) -> str:
        name = raw or self.default_model or ""
        self.repo.model(name)  # NOT_FOUND names the known models
        return name

    def list_models(self) -> list[common_pb2.ModelInfo]:
        return [model_info(s) for s in self.repo.statuses()]

    async def load_model(self, name: str, checkpoint_path: str) -> common_pb2.ModelInfo:
        """Load or reload; a refused checkpoint leaves a serving version serving, and the error names
        the file and the reason."""
        name = self._name(name)
        path = checkpoint_under(self.models_path, checkpoint_path)
        shown = str(path) if path is not None else "the configured checkpoint"
        try:
            status = await self.repo.load(name, path)
        except CheckpointError as exc:
            if path is not None and str(path) not in exc.message:
                raise CheckpointError(f"{shown}: {exc.message}", reason=exc.reason, metadata=exc.metadata) from exc
            raise
        except CxrError:
            raise
        except Exception as exc:  # the model's own loader failed: still the caller's checkpoint, not our bug
            raise CheckpointError(
                f"model '{name}' could not load {shown}: {type(exc).__name__}: {exc}", reason="MODEL_LOAD_FAILED"
            ) from exc
        return model_info(status)

    async def unload_model(self, name: str) -> common_pb2.ModelInfo:
        return model_info(await self.repo.unload(self._name(name)))
