"""Which file a checkpoint path names, whether a client may name it, and its bytes, read once.

A client names a checkpoint by a path on the server, so the path rule applies to the file that is
finally opened: a directory names the one weights file inside it, and that file, resolved with
symlinks followed, must lie under `models_path` (PERMISSION_DENIED `CHECKPOINT_PATH_OUTSIDE`
otherwise). Loaders read the file once and hash and deserialize those same bytes, so the version a
response reports is the weights that answer it. Every service's loader and `ModelAdmin` use this.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cxr_serving.errors import CheckpointError, CheckpointPathError, InvalidInputError

# A directory (e.g. the deployment guide's `/mnt/models/fourteen_class_classifier`) names the one weights file
# inside it: these names first, else the only file with a weights suffix.
DIRECTORY_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth", "model.pth.tar", "model.ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".tar", ".ckpt")
MAX_LISTED = 8
VERSION_LENGTH = 12


# What torch.load raises for bytes that are not a (weights-only) checkpoint, as seen with empty,
# truncated, zip-junk, text and pickled-object files (safetensors raises its own SafetensorError,
# which its loaders add: the runtime does not depend on safetensors). Only the deserializing call is
# wrapped with these, and out-of-memory is excluded (`out_of_memory`): anything else is a bug.
CHECKPOINT_DATA_ERRORS: tuple[type[Exception], ...] = (
    pickle.UnpicklingError,  # not a pickle, or a pickle that weights_only refuses
    EOFError,  # empty or cut short
    RuntimeError,  # torch's zip reader: "PytorchStreamReader failed reading zip archive"
    KeyError,  # torch's legacy reader on a file without its magic number
    ValueError,  # includes UnicodeDecodeError
    zipfile.BadZipFile,
)


@dataclass(frozen=True)
class CheckpointBytes:
    """One checkpoint file as read: where it is, its bytes, and their short SHA-256 (the model version)."""

    path: Path
    data: bytes
    version: str


def out_of_memory(exc: BaseException) -> bool:
    """Host or accelerator memory ran out (torch's CPU allocator raises a plain RuntimeError)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "not enough memory" in text)


def checkpoint_file(path: Path) -> Path:
    """The weights file itself: `path`, or the one weights file in the directory `path`."""
    try:
        if not path.is_dir():
            if not path.is_file():
                raise CheckpointError(
                    f"checkpoint {path} does not exist or is not a file", reason="CHECKPOINT_NOT_FOUND"
                )
            return path
        for name in DIRECTORY_FILES:
            if (path / name).is_file():
                return path / name
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {path} could not be looked up: {exc.strerror or exc}", reason="CHECKPOINT_UNREADABLE"
        ) from None
    if len(files) == 1:
        return files[0]
    found = [p.name for p in files][:MAX_LISTED]
    raise CheckpointError(
        f"checkpoint directory {path} must hold one of {list(DIRECTORY_FILES)} or exactly one weights file "
        f"({', '.join(WEIGHT_SUFFIXES)}); found {found or 'none'}",
        reason="CHECKPOINT_NOT_FOUND",
    )


def _outside(raw: str, models_path: Path) -> CheckpointPathError:
    return CheckpointPathError(
        f"checkpoint_path {raw!r} resolves to a file outside models_path ({models_path}); "
        "put the checkpoint under models_path and name it relative to it",
        metadata={"checkpoint_path": raw},
    )


def client_checkpoint(models_path: Path | None, raw: str) -> Path | None:
    """The weights file a client asked for, fully resolved and under `models_path`; None for "the
    configured one" (empty `raw`). The rule is checked on the named path before anything inside it
    is looked at, and again on the file a directory expands to."""
    if not raw:
        return None
    if models_path is None:
        raise CheckpointPathError(
            "LoadModel with a checkpoint_path needs models_path (CXR_MODELS_PATH) to be set on the server: "
            "only checkpoints under it may be loaded; leave checkpoint_path empty to reload the configured one"
        )
    try:
        base = models_path.resolve()
        path = Path(raw)
        named = (path if path.is_absolute() else base / path).resolve()
    except (ValueError, OSError) as exc:  # a NUL byte, a name too long for the file system
        raise InvalidInputError(
            f"checkpoint_path {raw!r} is not a usable file path ({exc}); name a file under models_path",
            reason="CHECKPOINT_PATH_INVALID",
            metadata={"checkpoint_path": raw[:200]},
        ) from None
    if not named.is_relative_to(base):
        raise _outside(raw, models_path)
    try:
        final = checkpoint_file(named).resolve()  # a link inside a directory may point anywhere
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {named} could not be resolved: {exc}", reason="CHECKPOINT_UNREADABLE"
        ) from None
    if not final.is_relative_to(base):
        raise _outside(raw, models_path)
    return final


def read_checkpoint(path: Path) -> CheckpointBytes:
    """Open the weights file once and read it whole: the caller hashes and deserializes these bytes,
    never the path again, so a file replaced after the check is not what gets loaded."""
    file = checkpoint_file(path)
    try:
        with file.open("rb") as f:
            data = f.read()
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {file} could not be read: {exc.strerror or exc}", reason="CHECKPOINT_UNREADABLE"
        ) from None
    return CheckpointBytes(file, data, hashlib.sha256(data).hexdigest()[:VERSION_LENGTH])
