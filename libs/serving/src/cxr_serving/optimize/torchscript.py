"""TorchScript trace + freeze of a network at load, for CPU forwards (`performance.trace_models`).

An eager forward walks the network's Python modules on every call: for densenet121 (~430 modules,
a `torch.cat` per dense layer) that is a fixed cost per forward, a few ms, which a batch of 2-3
pays per 2-3 images. A traced, frozen graph runs the same aten ops from C++ with the weights as
constants, without that cost; torch.compile is not used on CPU because its long compile bought
almost nothing there.

The traced graph is kept only if it answers like the eager network: on the load example, on a
batch of two (so a batch size baked into the trace shows) and on a batch of three fixed standard
normal inputs (so a shape that depends on the example's values shows), within `tolerance`
of the eager output's scale. Anything that fails to trace or to match keeps the eager network, and
the load logs why.
`torch.jit` is deprecated upstream in favour of torch.export; the warnings it raises while
tracing are silenced here, and the eager path stays the fallback.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from cxr_serving.optimize.amp import output_deviation

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4


def traced(module: Any, example: Any, tolerance: float = DEFAULT_TOLERANCE) -> tuple[Any, str]:
    """(the frozen traced module, "") or (`module` unchanged, why not)."""
    import torch

    pair = torch.cat([example, example.flip(0) if example.shape[0] > 1 else example * 0.5])
    checks = [example, pair]
    if example.is_floating_point():
        seeded = torch.Generator(device=example.device).manual_seed(0)
        shape = (3, *example.shape[1:])
        checks.append(torch.randn(shape, generator=seeded, dtype=example.dtype, device=example.device))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarning, and torch.jit's deprecation notice
            graph = torch.jit.freeze(
                torch.jit.trace(module.eval(), example, check_trace=False, strict=False)  # type: ignore[no-untyped-call]
            )
            deviation = max(output_deviation(module(x), graph(x)) for x in checks)
    except Exception as exc:  # a network torch.jit cannot trace: serve it eagerly
        return module, f"trace failed ({type(exc).__name__}: {str(exc)[:200]})"
    if not deviation <= tolerance:
        return module, f"traced output deviates by {deviation:.3g} (tolerance {tolerance:g})"
    return graph, ""


def is_traced(module: Any) -> bool:
    import torch

    return isinstance(module, torch.jit.ScriptModule)
