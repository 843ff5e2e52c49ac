"""Mixed precision for inference (`performance.use_amp`), on GPU and on CPUs that compute bfloat16 natively.

Reduced precision makes forwards faster where the hardware computes it natively, so a network runs
under autocast and is kept only if it answers a test input like float32 does: a guard against networks
that break in reduced precision, not a claim about clinical accuracy. How: docs/serving-runtime.md.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any

log = logging.getLogger(__name__)

# A network whose reduced-precision output is further than this from float32 (as a fraction of the
# output's scale) serves float32: above what the served architectures show, below a broken layer's O(1).
DEFAULT_TOLERANCE = 0.05


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX) and torch has oneDNN.
    Not oneDNN's own `_is_mkldnn_bf16_supported`: that also says yes on plain AVX512 cores, where
    bf16 is emulated and no faster than float32."""
    import torch

    try:
        if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
            return False
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # an old or stripped build: no such query
        return False


def _float32(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):
        return {k: _float32(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(_float32(v) for v in out)
    return out


@functools.cache
def _autocast_module() -> Any:
    import torch
    from torch import nn

    class Autocast(nn.Module):
        """`inner` under torch.autocast; floating outputs come back as float32."""

        def __init__(self, inner: nn.Module, device_type: str, dtype: torch.dtype) -> None:
            super().__init__()
            self.inner, self.device_type, self.dtype = inner, device_type, dtype

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            # no cast cache: each weight is used once per forward (the cache lives for one context),
            # and a cached cast made outside a CUDA graph recording must not be read inside it
            with torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=False):
                out = self.inner(*args, **kwargs)
            return _float32(out)

    return Autocast


def precision_of(module: Any) -> str:
    """'bfloat16' / 'float16' for a network wrapped by `with_autocast`, else 'float32'."""
    from cxr_serving.optimize.cuda_graphs import unwrapped

    module = unwrapped(getattr(module, "_orig_mod", module))  # torch.compile's or the CUDA graphs' wrapper
    return str(module.dtype).removeprefix("torch.") if isinstance(module, _autocast_module()) else "float32"


def output_deviation(reference: Any, got: Any) -> float:
    """max |got - reference| / max(1, max |reference|) over the output tensors; inf if any is not finite
    or the structure differs."""
    import torch

    from cxr_serving.optimize.fold import output_tensors

    ref, out = output_tensors(reference), output_tensors(got)
    if len(ref) != len(out):
        return float("inf")
    worst = 0.0
    for r, g in zip(ref, out, strict=True):
        if r.shape != g.shape:
            return float("inf")
        if not g.numel():
            continue
        g, r = g.float(), r.float()
        if not bool(torch.isfinite(g).all()):
            return float("inf")
        scale = max(1.0, float(r.abs().max()))
        worst = max(worst, float((g - r).abs().max()) / scale)
    return worst


def _weights_cast(module: Any, dtype: Any) -> Any:
    """A copy of `module` whose plain Conv/Linear layers (exact types: a subclass may use its weight
    some other way, e.g. weight standardisation) hold their parameters in `dtype`."""
    from torch import nn

    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)
    out = copy.deepcopy(module)
    for m in out.modules():
        if type(m) in kinds:
            m.to(dtype)
    return out


def with_autocast(
    module: Any, device_type: str, dtype: Any, example: Any = None, tolerance: float = DEFAULT_TOLERANCE
) -> tuple[Any, float | None]:
    """(`module` wrapped to run under autocast, its deviation from float32 on `example`), or
    (`module`, deviation) unchanged when the deviation exceeds `tolerance`. Without an example the
    module is wrapped unchecked (deviation None). With an example the wrapper holds weights cast at load
    when that gives the very same output."""
    import torch

    autocast = _autocast_module()
    wrapped = autocast(module, device_type, dtype)
    if example is None:
        return wrapped, None
    with torch.inference_mode():
        reference = module(example)
        got = wrapped(example)
    deviation = output_deviation(reference, got)
    if deviation > tolerance:
        log.warning(
            "%s autocast changes this network's output by %.3g of its scale (tolerance %.3g): serving float32",
            str(dtype).removeprefix("torch."),
            deviation,
            tolerance,
        )
        return module, deviation
    with torch.no_grad():  # not inference_mode: the copy's parameters stay ordinary tensors
        cast = autocast(_weights_cast(module, dtype), device_type, dtype)
    with torch.inference_mode():
        same = output_deviation(got, cast(example)) == 0.0  # bit-identical (finite, same structure)
    if not same:
        log.info("weights cast at load change this network's output: autocast casts them per forward")
    return (cast if same else wrapped), deviation
