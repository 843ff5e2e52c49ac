"""Where and how a model runs: the device, its backend flags and the speed options of `optimize/`,
each kept only if the model still answers like float32, with a clean CPU fallback. Imports torch
lazily so a service without torch need not install it."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr_serving.optimize.allocator import keep_freed_memory
from cxr_serving.optimize.amp import DEFAULT_TOLERANCE, cpu_has_native_bf16, with_autocast
from cxr_serving.optimize.cuda_graphs import with_cuda_graphs
from cxr_serving.optimize.fold import fold_batchnorm
from cxr_serving.optimize.torchscript import traced
from cxr_serving.settings import PerformanceConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceDevice:
    """Resolved device and the paths that apply to it."""

    device: str
    use_amp: bool
    amp_dtype: str
    channels_last: bool
    compile: bool
    fold_batchnorm: bool = False
    amp_tolerance: float = DEFAULT_TOLERANCE
    trace: bool = False  # TorchScript trace + freeze at load (optimize/torchscript.py): CPU, float32
    compile_mode: str = "default"  # torch.compile's mode, when compile is on
    cuda_graphs: bool = False  # replay CUDA graphs (optimize/cuda_graphs.py): GPU, without compile
    tf32: bool = True  # performance.tf32: float32 may compute in TensorFloat-32 on a GPU (TensorRT follows it)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @classmethod
    def resolve(cls, requested: str, perf: PerformanceConfig) -> InferenceDevice:
        import torch

        device = requested
        if requested == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif requested.startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s requested but CUDA is not available: falling back to CPU", requested)
            device = "cpu"
        cuda = device.startswith("cuda")
        if not cuda and perf.cpu_threads is not None and torch.get_num_threads() != perf.cpu_threads:
            torch.set_num_threads(perf.cpu_threads)  # process-wide, as torch allows
        keep_freed_memory(perf.cpu_heap_pad_mb)  # process-wide too; before the first forward allocates
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = perf.tf32
            torch.backends.cudnn.allow_tf32 = perf.tf32
            torch.backends.cudnn.benchmark = perf.cudnn_benchmark
        use_amp, amp_dtype = perf.use_amp, perf.amp_dtype
        if use_amp and not cuda:
            if not cpu_has_native_bf16():
                log.warning("use_amp ignored on this CPU: no native bfloat16 (AVX512-BF16/AMX), float32 is faster")
                use_amp = False
            elif amp_dtype != "bfloat16":
                log.info("use_amp on CPU runs bfloat16 (amp_dtype %s is a GPU setting)", amp_dtype)
                amp_dtype = "bfloat16"
        return cls(
            device,
            use_amp,
            amp_dtype,
            perf.channels_last,
            perf.compile_models and cuda,
            perf.fold_batchnorm,
            perf.amp_tolerance,
            perf.trace_models and not cuda and not use_amp,
            perf.compile_mode,
            perf.cuda_graphs and cuda and not perf.compile_models,
            perf.tf32,
        )

    def prepare(self, model: Any, example: Any = None) -> Any:
        """Move an eval-mode module to the device with the configured memory format, fold its
        BatchNorms when `example` (one CPU input batch, small is fine) is given (a copy when any were
        folded: `model` itself is moved but not rewritten), trace and freeze it (CPU, float32: optimize/torchscript.py),
        wrap it in autocast when AMP is on (kept
        only if its output on `example` stays within amp_tolerance of float32: optimize/amp.py), compile if asked,
        else record CUDA graphs if asked (optimize/cuda_graphs.py).
        `amp.precision_of(result)` says which precision it serves."""
        import torch

        model = model.eval().to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if example is not None:
            example = self.batch_to_device(example)
        if self.fold_batchnorm and example is not None:
            model, folded = fold_batchnorm(model, example)
            if folded:
                log.info("folded %d BatchNorm layers into their convolutions", folded)
        if self.trace and example is not None:
            model, why_not = traced(model, example)
            if why_not:
                log.warning("serving the network eagerly: %s", why_not)
            else:
                log.info("serving a TorchScript trace of the network, frozen at load")
        if self.use_amp:
            model, deviation = with_autocast(model, self.device_type, self.autocast_dtype, example, self.amp_tolerance)
            if deviation is not None:
                log.info("%s autocast: output within %.2g of float32 on the load example", self.amp_dtype, deviation)
        if self.compile:
            # dynamic: the batcher forms every batch size up to max_batch_size; specialising on each
            # would recompile per size and fall back to eager past dynamo's recompile limit (8)
            model = torch.compile(model, mode=self.compile_mode, dynamic=True)
        elif self.cuda_graphs:
            model = with_cuda_graphs(model)
        return model

    def warmup_batch_sizes(self, max_batch_size: int, warmup_batches: int) -> list[int]:
        """Batch 1 on CPU; on a GPU every size the batcher can form (cuDNN picks, and CUDA graphs are
        recorded, per shape), so no request pays for it. Largest first: the graphs share one memory pool,
        and each smaller one then fits in what the larger ones left (vLLM records in this order too)."""
        if warmup_batches <= 0:
            return []
        return list(range(max_batch_size, 0, -1)) if self.is_cuda else [1]

    def warm_up(self, forward: Any, item_shape: tuple[int, ...], max_batch_size: int, warmup_batches: int) -> None:
        """`forward` (a prepared network, or a call around one) on zero batches of each of
        `warmup_batch_sizes`, `warmup_batches` times each. Then, on a GPU, hand the blocks the many shapes
        left in PyTorch's cache back to the driver (a recorded graph keeps its own pool)."""
        import torch

        for size in self.warmup_batch_sizes(max_batch_size, warmup_batches):
            x = self.batch_to_device(torch.zeros(size, *item_shape))
            for _ in range(warmup_batches):
                with self.inference():
                    forward(x)
        if self.is_cuda:
            torch.cuda.empty_cache()

    def stack_to_device(self, items: Sequence[Any]) -> Any:
        """The items (tensors of one shape) as one batch on the device, assembled by `stack_on_host`. On a GPU
        they are stacked straight into a page-locked buffer of this thread's and copied from it without waiting:
        one host copy instead of two (the stack, then the driver's staging of pageable memory), and the thread
        goes on to launch the forward while the copy runs. The buffer is reused only after its copy is done (a
        CUDA event on the target device's stream)."""
        import torch

        if not self.is_cuda or not items or not _numpy_stackable(items):
            return self.batch_to_device(stack_on_host(items))
        device = torch.device(self.device)
        shape = (len(items), *items[0].shape)
        with torch.cuda.device(device):  # the event and the copy on the model's GPU, not the current one
            staging = _staging.get(device, items[0].dtype, math.prod(shape))
            if staging is None:  # page-locked memory refused: the plain path
                return self.batch_to_device(stack_on_host(items))
            buffer, copied = staging
            copied.synchronize()  # the last copy from this buffer is done (normally long since)
            host = _copy_rows(items, buffer[: math.prod(shape)].view(shape))  # items checked above; the view fits
            batch = host.to(device, non_blocking=True)
            copied.record(torch.cuda.current_stream(device))
        if self.channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def batch_to_device(self, batch: Any) -> Any:
        import torch

        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    @property
    def device_type(self) -> str:
        return "cuda" if self.is_cuda else "cpu"

    @property
    def autocast_dtype(self) -> Any:
        import torch

        return torch.bfloat16 if self.amp_dtype == "bfloat16" else torch.float16

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """inference_mode (autocast, when AMP is on, lives in the network `prepare` returned)."""
        import torch

        with torch.inference_mode():
            yield


_NUMPY_DTYPES = ("float32", "float64", "float16", "uint8", "int8", "int16", "int32", "int64", "bool")


def _numpy_stackable(items: Sequence[Any], out: Any = None) -> bool:
    """True when numpy copies these exactly as torch.stack would: contiguous CPU tensors of one shape (at least
    one dimension) and one plain dtype, no grad, conjugate or negative bit; `out`, when given, a contiguous CPU
    tensor of the stacked shape and dtype."""
    import torch

    first = items[0]
    if str(first.dtype).removeprefix("torch.") not in _NUMPY_DTYPES or first.dim() == 0:
        return False
    plain = all(
        t.device.type == "cpu"
        and t.layout == torch.strided
        and t.dtype == first.dtype
        and t.shape == first.shape
        and t.is_contiguous()  # np.stack keeps the items' stride order; torch.stack's result is contiguous
        and not (t.requires_grad or t.is_conj() or t.is_neg())
        for t in items
    )
    if not plain or out is None:
        return plain
    return bool(
        out.device.type == "cpu"
        and out.dtype == first.dtype
        and tuple(out.shape) == (len(items), *first.shape)
        and out.is_contiguous()
        and not out.requires_grad
    )


def stack_on_host(items: Sequence[Any], out: Any = None) -> Any:
    """Tensors stacked into one (into `out` when given), copied by the calling thread alone (numpy), because
    torch.stack spreads even a small copy over torch's intra-op threads, which then spin for a while after it
    and take cores from decoding. Anything numpy would not copy exactly as torch does takes torch.stack, with
    its checks and errors. `out` must not overlap the items (torch.stack checks that; this path does not)."""
    import torch

    if not items or not _numpy_stackable(items, out):
        return torch.stack(list(items), out=out)
    if out is None:
        return torch.from_numpy(np.stack([t.numpy() for t in items]))
    return _copy_rows(items, out)


def _copy_rows(items: Sequence[Any], out: Any) -> Any:
    """Each item into its row of `out`, by numpy (`_numpy_stackable(items, out)` holds)."""
    target = out.numpy()
    for i, t in enumerate(items):
        np.copyto(target[i], t.numpy(), casting="no")
    return out


class _Staging(threading.local):
    """Each thread's page-locked input buffers by device and dtype, each with the event of its last copy."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[Any, Any], tuple[Any, Any]] = {}
        self.refused = False  # page-locked memory was refused: this thread stays on the plain path

    def get(self, device: Any, dtype: Any, numel: int) -> tuple[Any, Any] | None:
        """This thread's buffer of at least `numel` for `device` and `dtype` (call inside
        `torch.cuda.device(device)`); None when page-locked memory is refused."""
        import torch

        if self.refused:
            return None
        key = (device, dtype)
        held = self.buffers.get(key)
        if held is not None and held[0].numel() >= numel:
            return held
        if held is not None:
            held[1].synchronize()  # the old buffer's copy must finish before it is freed
        try:
            buffer = torch.empty(numel, dtype=dtype, pin_memory=True)
        except RuntimeError as exc:
            log.warning("page-locked input staging unavailable (%s); batches are copied from pageable memory", exc)
            self.buffers.pop(key, None)
            self.refused = True
            return None
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]  # not yet recorded: its wait returns at once
        self.buffers[key] = (buffer, event)
        return self.buffers[key]


_staging = _Staging()


def module_bytes(*modules: Any) -> dict[str, int]:
    """Bytes of the parameters and buffers of `modules` by device type ("cpu", "cuda"), each tensor counted
    once (a compiled runner shares its eager module's): what a loaded version holds, independent of the
    allocator's caching. A runner that is not a torch module (an OpenVINO or ONNX Runtime model) holds its
    memory outside torch and is not counted."""
    import torch

    seen: set[int] = set()
    out: dict[str, int] = {}
    for module in modules:
        if not isinstance(module, torch.nn.Module):
            continue
        for t in [*module.parameters(), *module.buffers()]:
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            out[t.device.type] = out.get(t.device.type, 0) + t.numel() * t.element_size()
    return out
