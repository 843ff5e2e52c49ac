"""Replay each forward as a CUDA graph (`performance.cuda_graphs`, GPU only).

Our networks are small for a GPU: an eager forward launches every kernel from Python, so the GPU waits
for the CPU, and that CPU time holds the GIL the event loop and decode threads need; a graph replays a
whole forward with one call. How graphs are recorded, checked and shared: docs/serving-runtime.md.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

MAX_GRAPHS = 64  # distinct input shapes recorded; past this, eager (shapes are bounded by max_batch_size)
TOLERANCE = 1e-3  # of the output's scale (amp.output_deviation); the same kernels should agree exactly


def _graph_module() -> Any:
    import torch
    from torch import nn

    from cxr_serving.optimize.amp import output_deviation

    class CudaGraphs(nn.Module):
        """`inner` replayed as one CUDA graph per input shape; eager for CPU inputs and after a failure."""

        def __init__(self, inner: nn.Module, max_graphs: int = MAX_GRAPHS) -> None:
            super().__init__()
            self.inner = inner
            self.max_graphs = max_graphs
            self.disabled_reason: str | None = None
            self._graphs: dict[tuple[Any, ...], tuple[Any, Any, Any]] = {}
            self._pool: Any = None
            self._lock = threading.Lock()

        @property
        def graph_count(self) -> int:
            return len(self._graphs)

        def forward(self, x: torch.Tensor) -> Any:
            if self.disabled_reason is not None or not x.is_cuda:
                return self.inner(x)
            key = (tuple(x.shape), x.dtype, x.stride(), x.device)
            with self._lock:
                entry = self._graphs.get(key)
                if entry is None:
                    if len(self._graphs) >= self.max_graphs:
                        return self.inner(x)
                    entry = self._record(x, key)
                    if entry is None:
                        return self.inner(x)
                static_in, static_out, graph = entry
                static_in.copy_(x)
                graph.replay()
                return static_out.clone()  # the next replay overwrites static_out

        def _record(self, x: torch.Tensor, key: tuple[Any, ...]) -> tuple[Any, Any, Any] | None:
            static_in = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
            static_in.copy_(x)
            try:
                side = torch.cuda.Stream(device=x.device)  # type: ignore[no-untyped-call]
                side.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(side):  # lazy initialisation (cuBLAS handles, workspaces) happens here
                    for _ in range(2):
                        self.inner(static_in)
                torch.cuda.current_stream(x.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    static_out = self.inner(static_in)
                if not isinstance(static_out, torch.Tensor):
                    return self._give_up(f"the network returns {type(static_out).__name__}, not one tensor")
                graph.replay()
                if not self._graphs:
                    eager = self.inner(x)
                    deviation = output_deviation(eager, static_out)
                    if deviation > TOLERANCE:
                        return self._give_up(f"its replay differs from the eager network by {deviation:.3g}")
            except Exception as exc:  # a network that cannot be recorded is served eagerly, not refused
                torch.cuda.synchronize(x.device)
                return self._give_up(
                    f"recording failed ({type(exc).__name__}: {exc}); the process's CUDA random number "
                    "generator may be left unusable"
                )
            if self._pool is None:
                self._pool = graph.pool()
            self._graphs[key] = (static_in, static_out, graph)
            return self._graphs[key]

        def _give_up(self, why: str) -> tuple[Any, Any, Any] | None:
            """No graphs from now on: None, for `_record` to return."""
            self.disabled_reason = why
            self._graphs.clear()
            log.warning("serving the network without CUDA graphs: %s", why)
            return None

    return CudaGraphs


@functools.cache
def graph_class() -> Any:
    return _graph_module()


def with_cuda_graphs(module: Any) -> Any:
    """`module` wrapped to replay CUDA graphs (recorded on first use of each input shape)."""
    return graph_class()(module)


def unwrapped(module: Any) -> Any:
    """The network inside a `with_cuda_graphs` wrapper (or `module` itself)."""
    return module.inner if isinstance(module, graph_class()) else module
