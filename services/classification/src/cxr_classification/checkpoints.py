"""Read a checkpoint in any of the layouts we meet and load it into a network, or say exactly why not.

Layouts:
- a plain `state_dict` (`torch.save(model.state_dict())`), `.pt`/`.pth`/`.bin`;
- a training checkpoint dict with the weights under `state_dict`, `model`, `model_state_dict`,
  `net` or `ema` (Lightning, timm's train.py, most scripts); `module.` (DataParallel/DDP),
  `_orig_mod.` (torch.compile) and Lightning's `model.` prefixes are stripped;
- CheXNet (arnoweng/CheXNet `model.pth.tar`): `module.densenet121.` prefix, the pre-0.4
  torchvision DenseNet names (`norm.1`, `relu.1`, `conv.1`, `norm.2`, `conv.2`) and a
  `classifier.0` Linear inside a Sequential with the sigmoid;
- torchxrayvision's DenseNet (`torch.save(xrv.models.DenseNet(weights=...).state_dict())`):
  torchvision names with a 1-channel stem and an `op_threshs` buffer (operating points);
- `safetensors` files of any of the above.

Files are read with `torch.load(weights_only=True)`; whole pickled models (the original
torchxrayvision release files) need `allow_pickle: true` because unpickling runs code.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr_serving.checkpoint_files import CHECKPOINT_DATA_ERRORS, CheckpointBytes, out_of_memory, read_checkpoint
from cxr_serving.errors import CheckpointError

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "ema", "state_dict_ema", "model_ema")
STRIPPABLE_PREFIXES = ("module.", "_orig_mod.", "model.", "densenet121.", "net.")
_OLD_DENSENET_NAME = re.compile(r"\.(norm|relu|conv)\.([12])\.")
SAFETENSORS_SUFFIX = ".safetensors"
MAX_LISTED = 8


@dataclass
class Checkpoint:
    """Tensors ready for `load_state_dict`, plus what came with them."""

    state_dict: dict[str, torch.Tensor]
    op_threshs: torch.Tensor | None = None  # torchxrayvision operating points
    version: str = ""  # short SHA-256 of the bytes these tensors were read from


def _is_safetensors(ckpt: CheckpointBytes, fmt: str) -> bool:
    if fmt == "safetensors" or ckpt.path.suffix == SAFETENSORS_SUFFIX:
        return True
    head = ckpt.data[:9]
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _reraise_out_of_memory(exc: Exception) -> None:
    if out_of_memory(exc):
        raise exc


def read_tensors(ckpt: CheckpointBytes, fmt: str = "auto", allow_pickle: bool = False) -> Mapping[str, Any]:
    """The raw object of a checkpoint read once (`read_checkpoint`), as a mapping of names to tensors (maybe nested)."""
    path = ckpt.path
    if _is_safetensors(ckpt, fmt):
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            return load(ckpt.data)
        except (SafetensorError, *CHECKPOINT_DATA_ERRORS) as exc:  # type: ignore[misc]
            _reraise_out_of_memory(exc)
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {exc}") from None
    try:
        obj = torch.load(io.BytesIO(ckpt.data), map_location="cpu", weights_only=True)
    except CHECKPOINT_DATA_ERRORS as exc:
        _reraise_out_of_memory(exc)
        if not allow_pickle:
            raise CheckpointError(
                f"checkpoint {path} could not be read as weights only ({type(exc).__name__}: {str(exc)[:300]}). "
                "If it is a whole pickled model from a source you trust, set allow_pickle: true, or convert it once: "
                "torch.save(torch.load(path, weights_only=False).state_dict(), 'weights.pt')"
            ) from None
        try:  # unpickling runs the file's own code (trusted by allow_pickle): a missing class is a bad file too
            obj = torch.load(io.BytesIO(ckpt.data), map_location="cpu", weights_only=False)
        except (*CHECKPOINT_DATA_ERRORS, AttributeError, ImportError, TypeError) as exc2:  # type: ignore[misc]
            _reraise_out_of_memory(exc2)
            raise CheckpointError(f"checkpoint {path} could not be read: {type(exc2).__name__}: {exc2}") from None
    return unwrap(obj, path)


def unwrap(obj: Any, path: Path) -> Mapping[str, Any]:
    """Dig the weights out of training checkpoints and pickled modules."""
    for _ in range(4):
        if isinstance(obj, nn.Module):
            return obj.state_dict()
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping | nn.Module)), None)
        if inner is None:
            break
        obj = inner
    kind = type(obj).__name__
    keys = sorted(obj)[:MAX_LISTED] if isinstance(obj, Mapping) else []
    raise CheckpointError(
        f"checkpoint {path} holds a {kind} without a state dict (top-level keys: {keys}); "
        f"expected tensors, or a dict with one of {list(WRAPPER_KEYS)}"
    )


def normalize_keys(raw: Mapping[str, Any], expected: set[str], fmt: str = "auto") -> Checkpoint:
    """Rename keys from the known layouts to the network's own names."""
    tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    op_threshs = tensors.pop("op_threshs", None)
    if op_threshs is not None and fmt not in ("auto", "xrv"):
        raise CheckpointError(f"checkpoint has torchxrayvision operating points (op_threshs) but format is '{fmt}'")
    tensors = _strip_prefixes(tensors, expected)
    if fmt in ("auto", "chexnet"):
        tensors = {_rename_chexnet(k): v for k, v in tensors.items()}
    if fmt == "chexnet" and not any(k.startswith("classifier.") for k in tensors):
        raise CheckpointError("checkpoint_format is 'chexnet' but the checkpoint has no classifier weights")
    return Checkpoint(tensors, op_threshs)


def _strip_prefixes(tensors: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and tensors:
        changed = False
        if set(tensors) & expected:
            break
        for prefix in STRIPPABLE_PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
                changed = True
                break
    return tensors


def _rename_chexnet(key: str) -> str:
    """`denselayer1.norm.1.weight` -> `denselayer1.norm1.weight`; `classifier.0.` -> `classifier.`."""
    key = _OLD_DENSENET_NAME.sub(lambda m: f".{m.group(1)}{m.group(2)}.", key)
    if key.startswith("classifier.0."):
        key = "classifier." + key[len("classifier.0.") :]
    return key


def check_compatible(net: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Raise a CheckpointError listing missing, unexpected and mis-shaped tensors."""
    own = net.state_dict()
    missing = sorted(k for k in own if k not in tensors and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in tensors if k not in own)
    shapes = sorted(
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)
    )
    if not (missing or unexpected or shapes):
        return
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
            parts.append(f"{len(items)} {title}: {items[:MAX_LISTED]}{more}")
    raise CheckpointError(
        f"checkpoint {path} does not match the configured architecture: " + "; ".join(parts),
        reason="CHECKPOINT_MISMATCH",
        metadata={"missing": str(len(missing)), "unexpected": str(len(unexpected)), "mismatched": str(len(shapes))},
    )


def load_checkpoint(net: nn.Module, path: Path, fmt: str = "auto", allow_pickle: bool = False) -> Checkpoint:
    """Read `path` (a file, or a directory's one weights file) once, rename its keys for `net`, check
    them, load them. Returns what was loaded, with the hash of the bytes it came from."""
    data = read_checkpoint(path)
    path = data.path
    ckpt = normalize_keys(read_tensors(data, fmt, allow_pickle), set(net.state_dict()), fmt)
    ckpt.version = data.version
    if ckpt.op_threshs is not None:
        ckpt.op_threshs = ckpt.op_threshs.float()
    check_compatible(net, ckpt.state_dict, path)
    net.load_state_dict(ckpt.state_dict, strict=False)  # checked above; num_batches_tracked may be absent
    return ckpt
