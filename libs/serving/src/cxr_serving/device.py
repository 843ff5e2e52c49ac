"""Inference device settings (DESIGN.md §3): device choice, TF32, cuDNN benchmark,
AMP and optional torch.compile on GPU; BatchNorm folding (fold.py) and channels_last on both (on CPU oneDNN runs NHWC
convolutions faster: bench/README.md); the CPU thread count; a clean CPU fallback.
Imports torch lazily so services without torch (none today) need not install it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cxr_serving.fold import fold_batchnorm
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
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = perf.tf32
            torch.backends.cudnn.allow_tf32 = perf.tf32
            torch.backends.cudnn.benchmark = perf.cudnn_benchmark
        return cls(
            device,
            perf.use_amp and cuda,
            perf.amp_dtype,
            perf.channels_last,
            perf.compile_models and cuda,
            perf.fold_batchnorm,
        )

    def prepare(self, model: Any, example: Any = None) -> Any:
        """Move an eval-mode module to the device with the configured memory format, fold its
        BatchNorms when `example` (one CPU input batch, small is fine) is given (a copy when any were
        folded: `model` itself is moved but not rewritten), compile if asked."""
        import torch

        model = model.eval().to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.fold_batchnorm and example is not None:
            model, folded = fold_batchnorm(model, self.batch_to_device(example))
            if folded:
                log.info("folded %d BatchNorm layers into their convolutions", folded)
        if self.compile:
            model = torch.compile(model, mode="max-autotune-no-cudagraphs", dynamic=True)
        return model

    def batch_to_device(self, batch: Any) -> Any:
        import torch

        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """inference_mode, plus autocast on GPU when AMP is on."""
        import torch

        with torch.inference_mode():
            if self.use_amp:
                dtype = torch.bfloat16 if self.amp_dtype == "bfloat16" else torch.float16
                with torch.autocast("cuda", dtype=dtype):
                    yield
            else:
                yield
