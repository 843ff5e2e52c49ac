"""Read a checkpoint file into a state dict and apply it to a network, with errors a human can act on.

Accepted layouts: a plain state_dict; a training dict holding it under `state_dict`, `model`,
`model_state_dict` or `net`; keys prefixed by `module.` (DataParallel/DDP) or `_orig_mod.`
(torch.compile); `.safetensors` files. Pickles are read with `weights_only=True`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr_serving.checkpoint_files import CHECKPOINT_DATA_ERRORS, CheckpointBytes, out_of_memory, read_checkpoint
from cxr_serving.errors import CheckpointError

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")
PREFIXES = ("module.", "_orig_mod.", "model.")
MAX_LISTED = 8


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load `path` and return a flat {name: tensor} mapping with wrapper keys and prefixes removed."""
    return _state_dict_of(read_checkpoint(path))


def _state_dict_of(ckpt: CheckpointBytes) -> dict[str, torch.Tensor]:
    """Deserialize bytes read once; only what a bad file makes torch/safetensors raise is a CheckpointError."""
    from safetensors import SafetensorError

    try:
        if ckpt.path.suffix == ".safetensors":
            from safetensors.torch import load

            raw: Any = load(ckpt.data)
        else:
            raw = torch.load(io.BytesIO(ckpt.data), map_location="cpu", weights_only=True)
    except (SafetensorError, *CHECKPOINT_DATA_ERRORS) as exc:  # type: ignore[misc]
        if out_of_memory(exc):
            raise
        raise CheckpointError(
            f"checkpoint {ckpt.path} could not be read ({type(exc).__name__}: {str(exc)[:300]})",
            reason="CHECKPOINT_UNREADABLE",
        ) from None
    return normalize_state_dict(raw, source=str(ckpt.path))


def normalize_state_dict(raw: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Unwrap a training dict and strip `module.`-style prefixes shared by every key."""
    state = raw
    for _ in range(3):  # nested wrappers, e.g. {"model": {"state_dict": ...}}
        if isinstance(state, Mapping) and not _is_tensor_mapping(state):
            inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, Mapping) or not state or not _is_tensor_mapping(state):
        found = sorted(state)[:MAX_LISTED] if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointError(
            f"{source}: no state_dict found (expected a mapping of tensors, or one under {list(WRAPPER_KEYS)}; "
            f"found {found})",
            reason="CHECKPOINT_INVALID",
        )
    out = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


def _is_tensor_mapping(m: Mapping[Any, Any]) -> bool:
    values = list(m.values())
    return bool(values) and sum(isinstance(v, torch.Tensor) for v in values) >= max(1, len(values) // 2)


def apply_state_dict(net: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strict load; a mismatch names the missing/unexpected keys and the differing shapes."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {_few(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({_few(shapes)})")
        raise CheckpointError(
            f"{source} does not match the configured network: "
            + "; ".join(parts)
            + ". Check models.segmentation architecture/encoder/classes/checkpoint_format.",
            reason="CHECKPOINT_MISMATCH",
        )
    net.load_state_dict(dict(state), strict=True)


def _few(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (", ..." if len(items) > MAX_LISTED else "")


def load_checkpoint(net: nn.Module, path: Path) -> str:
    """Read `path` (a file, or a directory's one weights file) once and load it; returns the version
    (short SHA-256) of exactly the bytes loaded."""
    ckpt = read_checkpoint(path)
    apply_state_dict(net, _state_dict_of(ckpt), source=f"checkpoint {ckpt.path}")
    return ckpt.version
