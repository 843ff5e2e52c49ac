"""Load-time rewrite for inference: fold each BatchNorm into the convolution that feeds it.

In eval mode a BatchNorm after a convolution is a per-channel affine map, so merging it into that
convolution's weight and bias gives the same function (up to float rounding) with one pass over the
activations instead of two. How the pairs are found and checked: docs/serving-runtime.md.

Pairs are found with forward hooks, not torch.fx, because fx's tracer patches `torch.nn.Module.__call__`
for the whole process while it traces, which breaks a forward of another model on another thread.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import Any

log = logging.getLogger(__name__)

# Folded outputs must match the original to this fraction of the output's scale; a wrong fold is off by O(1).
_TOLERANCE = 1e-3


def fold_batchnorm(module: Any, example: Any) -> tuple[Any, int]:
    """(a copy of `module` with Conv->BatchNorm pairs folded, how many), or (`module`, 0) when nothing folds.

    `module` must be in eval mode and on `example`'s device; `example` is one input batch (small is fine)."""
    if module.training:
        raise ValueError("fold_batchnorm needs a module in eval mode (running statistics)")
    try:
        pairs, reference = _conv_bn_pairs(module, example)
        if not pairs:
            return module, 0
        folded = _folded(module, pairs)
        if not _same(folded, example, reference):  # some pair's conv output is used elsewhere too
            pairs = [p for p in pairs if _same(_folded(module, [p]), example, reference)]
            folded = _folded(module, pairs)
            if not pairs or not _same(folded, example, reference):
                return module, 0
        return folded, len(pairs)
    except Exception as exc:  # a folding problem must never fail a model load
        log.warning("BatchNorm folding skipped for %s: %s: %s", type(module).__name__, type(exc).__name__, exc)
        return module, 0


def _conv_bn_pairs(module: Any, example: Any) -> tuple[list[tuple[str, str]], list[Any]]:
    """(conv, batchnorm) names where the BatchNorm's input is the conv's output, each called once; and
    the output tensors of that forward (the reference a folded copy must match)."""
    import torch
    from torch import nn

    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    produced: dict[int, tuple[str, Any]] = {}  # id(output) -> (conv, output): holding it keeps the id unique
    calls: Counter[str] = Counter()
    found: list[tuple[str, str]] = []

    def after_conv(name: str) -> Any:
        def hook(_m: Any, _args: Any, out: Any) -> None:
            calls[name] += 1
            produced[id(out)] = (name, out)

        return hook

    def before_norm(name: str) -> Any:
        def hook(_m: Any, args: Any) -> None:
            calls[name] += 1
            hit = produced.get(id(args[0])) if len(args) == 1 else None
            if hit is not None and hit[1] is args[0]:
                found.append((hit[0], name))

        return hook

    handles = []
    try:
        for name, m in module.named_modules():
            if isinstance(m, convs):
                handles.append(m.register_forward_hook(after_conv(name)))
            elif isinstance(m, norms) and m.running_mean is not None and m.running_var is not None:
                handles.append(m.register_forward_pre_hook(before_norm(name)))
        with torch.inference_mode():
            output = output_tensors(module(example))
    finally:
        for h in handles:
            h.remove()
    uses = Counter(conv for conv, _ in found)
    return [(c, b) for c, b in found if calls[c] == 1 and calls[b] == 1 and uses[c] == 1], output


def _folded(module: Any, pairs: list[tuple[str, str]]) -> Any:
    import torch
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    out = copy.deepcopy(module)
    with torch.no_grad():
        for conv, bn in pairs:
            _set(out, conv, fuse_conv_bn_eval(out.get_submodule(conv), out.get_submodule(bn)))
            _set(out, bn, nn.Identity())
    return out.eval()


def _same(module: Any, example: Any, reference: list[Any]) -> bool:
    import torch

    with torch.inference_mode():
        got = output_tensors(module(example))
    if len(got) != len(reference):
        return False
    for g, r in zip(got, reference, strict=True):
        scale = max(1.0, float(r.abs().max())) if r.numel() else 1.0
        if g.shape != r.shape:
            return False
        if g.numel() and float((g.float() - r.float()).abs().max()) > _TOLERANCE * scale:
            return False
    return True


def output_tensors(out: Any) -> list[Any]:
    """The tensors of a forward's output (a tensor, or a dict/tuple/list of them), in order."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, tuple | list):
        return [t for v in out for t in output_tensors(v)]
    return []


def _set(root: Any, target: str, new: Any) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, new)
