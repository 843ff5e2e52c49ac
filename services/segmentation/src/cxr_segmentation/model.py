"""The segmentation network as a `ServedModel`: load (checkpoint or refuse), batched forward, unload.

`preprocess` turns a decoded image into a C x S x S tensor; `predict` takes those and returns
C x S x S logits on the CPU; `postprocess` (upsampling to the original size, thresholding,
encoding) then runs per request on the decode pool (see `postprocess.py`). On a GPU
(`masks_on_device`), items are `SegmentationInput`s carrying the original size and threshold:
masks are made on the device right after the forward pass, so only 1-byte masks cross to the
host and the CPU is left with encoding.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxr_segmentation.checkpoints import load_checkpoint
from cxr_segmentation.config import SegmentationConfig
from cxr_segmentation.masks import logits_to_masks
from cxr_segmentation.networks import LogitsOf, build_network, output_logits
from cxr_segmentation.postprocess import PostprocessOptions, SegmentationResult, postprocess
from cxr_segmentation.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from cxr_serving.device import InferenceDevice, module_bytes
from cxr_serving.errors import CheckpointError, ModelNotReadyError
from cxr_serving.images import DecodedImage
from cxr_serving.lifecycle import UNTRAINED, ServedModel
from cxr_serving.optimize.amp import precision_of
from cxr_serving.random_init import fixed_random_weights
from cxr_serving.runtimes.check import CheckResult, segmentation_check
from cxr_serving.runtimes.config import ResolvedRuntime
from cxr_serving.runtimes.prepare import RuntimeOutcome, RuntimeReport, RuntimeRequest, prepare_runtime, weights_digest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentationInput:
    """One batch item that asks for masks (C x H x W bool) instead of logits."""

    tensor: torch.Tensor
    size: tuple[int, int]  # original (H, W)
    threshold: float


class SegmentationModel(ServedModel):
    def __init__(
        self,
        cfg: SegmentationConfig,
        device: InferenceDevice,
        default_checkpoint: Path | None = None,
        warmup_batches: int = 1,
        max_batch_size: int = 1,
        runtime: ResolvedRuntime | None = None,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.task = cfg.task
        self.labels = tuple(cfg.classes)
        self.architecture = (
            "xrv:chestx_det.PSPNet"
            if cfg.checkpoint_format == "xrv_pspnet"
            else f"smp:{cfg.architecture}/{cfg.encoder}"
        )
        self.transform = Preprocess.from_config(cfg)
        self._device = device
        self._default_checkpoint = default_checkpoint
        self._warmup_batches = warmup_batches
        self._max_batch_size = max_batch_size
        self._net: nn.Module | None = None
        self._version = ""
        self._checkpoint: Path | None = None
        self._runtime = runtime
        self._outcome = RuntimeOutcome()  # what serves the forward (runtimes/prepare.py)
        self._lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------------------
    def build(self, checkpoint_path: Path | None) -> tuple[nn.Module, str]:
        """A CPU network with its weights and version; raises CheckpointError (never half-loads)."""
        path = checkpoint_path or self._default_checkpoint
        if path is None:
            if not self.cfg.allow_untrained:
                raise CheckpointError(
                    f"model '{self.name}' has no checkpoint: set models.{self.name}.checkpoint_path "
                    "(or allow_untrained=true for development: random weights, every response says untrained)",
                    reason="CHECKPOINT_NOT_CONFIGURED",
                )
            with fixed_random_weights(self.cfg.seed):
                net = build_network(self.cfg)
            return net, UNTRAINED
        net = build_network(self.cfg)
        return net, load_checkpoint(net, path)

    def load(self, checkpoint_path: Path | None = None) -> None:
        net, version = self.build(checkpoint_path)
        s = self.cfg.input_size
        outcome = self._prepare_runtime(net.eval(), version)
        example = torch.rand(1, self.cfg.in_channels, s, s, generator=torch.Generator().manual_seed(0))
        if outcome.forward is None:
            net = self._device.prepare(net, example=example)
            outcome = outcome.torch_serves(precision_of(net))
        self._outcome = outcome
        if outcome.forward is None:  # a runtime's forward was warmed up inside prepare_runtime (its fallback)
            self._warmup(net)
        with self._lock:
            self._net, self._version = net, version
            self._checkpoint = None if version == UNTRAINED else (checkpoint_path or self._default_checkpoint)
        if version == UNTRAINED:
            log.warning(
                "segmentation model %s serves RANDOM weights (allow_untrained): masks are meaningless", self.name
            )

    def runtime_identity(self, version: str, weights: str) -> dict[str, Any]:
        """What an exported network depends on besides the backend: checkpoint, weights, the config that shapes
        the graph, and the preprocessing int8 calibrated under (a new one must not reuse its scales)."""
        graph = self.cfg.model_dump(
            mode="json", include={"architecture", "encoder", "checkpoint_format", "classes", "in_channels"}
        )
        return {"version": version, "weights": weights, "graph": graph, "preprocessing": self.preprocessing}

    def _prepare_runtime(self, net: nn.Module, version: str) -> RuntimeOutcome:
        """The configured runtime for this network (CPU float32 here), checked on the Dice of its masks."""
        runtime = self._runtime
        if runtime is None or runtime.config.is_torch:
            return RuntimeOutcome()
        cfg = self.cfg
        min_dice = cfg.runtime.min_dice

        def judge(reference: np.ndarray, got: np.ndarray) -> CheckResult:
            return segmentation_check(reference, got, list(self.labels), min_dice)

        identity = self.runtime_identity(version, weights_digest(net))
        shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        request = RuntimeRequest(
            self.name, LogitsOf(net), shape, identity, self.transform_decoded, judge,
            max_batch_size=self._max_batch_size,
            warm_up=lambda forward: self._device.warm_up(forward, shape, self._max_batch_size, self._warmup_batches),
        )  # fmt: skip
        return prepare_runtime(runtime, request, device=self._device.device, tf32=self._device.tf32)

    def transform_decoded(self, decoded: DecodedImage) -> torch.Tensor:
        """A decoded image as the network's input tensor (the calibration images go through this)."""
        return self.transform(decoded.pixels)

    def _warmup(self, net: nn.Module) -> None:
        s = self.cfg.input_size
        self._device.warm_up(
            lambda x: self._logits(net, x), (self.cfg.in_channels, s, s), self._max_batch_size, self._warmup_batches
        )

    def memory_bytes(self) -> dict[str, int]:
        """Parameter and buffer bytes of the loaded network."""
        return module_bytes(self._net)

    def _logits(self, net: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        forward = self._outcome.forward
        return output_logits(net, batch) if forward is None else forward(batch).to(batch.device)

    def unload(self) -> None:
        with self._lock:
            self._net, self._version, self._checkpoint = None, "", None
            self._outcome = RuntimeOutcome()
        if self._device.is_cuda:
            torch.cuda.empty_cache()

    @property
    def checkpoint(self) -> Path | None:
        return self._checkpoint

    @property
    def preprocessing(self) -> dict[str, str]:
        """The Preprocess chain `preprocess` applies, with the normalisation's constants."""
        t = self.transform
        out = {
            "input_size": f"{t.input_size}x{t.input_size}",
            "channels": str(t.in_channels),
            "resize": "squash",
            "normalization": str(t.normalization),
            "input": "grayscale in [0, 1] (DICOM LUTs applied, MONOCHROME1 inverted)",
        }
        if t.normalization == "imagenet":
            c = t.in_channels
            mean = IMAGENET_MEAN[:c] if c == 3 else (float(np.mean(IMAGENET_MEAN)),)
            std = IMAGENET_STD[:c] if c == 3 else (float(np.mean(IMAGENET_STD)),)
            out["mean"] = ", ".join(f"{v:.4g}" for v in mean)
            out["std"] = ", ".join(f"{v:.4g}" for v in std)
        elif t.normalization == "xrv":
            out["range"] = "[-1024, 1024]"
        else:
            out["range"] = "[0, 1]"
        return out

    # --- inference -------------------------------------------------------------------------
    def preprocess(
        self, decoded: DecodedImage | np.ndarray, options: PostprocessOptions | None = None
    ) -> torch.Tensor | SegmentationInput:
        """A decoded image (or its grayscale pixels) -> the network input; with the request's `options`
        and `masks_on_device`, an item that asks `predict` for masks at the original size."""
        pixels = decoded.array if isinstance(decoded, DecodedImage) else decoded
        tensor = self.transform(pixels)
        if options is not None and isinstance(decoded, DecodedImage) and self.masks_on_device:
            return SegmentationInput(tensor, (decoded.height, decoded.width), options.threshold)
        return tensor

    def postprocess(self, output: Any, options: Any = None) -> SegmentationResult:
        """Logits (or device-made masks) of one image -> masks at its size, encodings, measurements, overlay,
        DICOM-SEG; `options` are the request's PostprocessOptions, carrying its decoded image."""
        if not isinstance(options, PostprocessOptions) or options.image is None:
            raise TypeError("postprocess needs the request's PostprocessOptions with its decoded image")
        return postprocess(options.image, output, self.labels, options)

    def _forward(self, net: nn.Module, items: list[torch.Tensor]) -> torch.Tensor:
        with self._device.inference():
            return self._logits(net, self._device.stack_to_device(items))

    @property
    def masks_on_device(self) -> bool:
        flag = self.cfg.masks_on_device
        return self._device.is_cuda if flag is None else flag

    def predict(self, batch: list[Any]) -> Sequence[Any]:
        """Tensors -> CPU float32 logits; `SegmentationInput`s -> bool masks at their original size."""
        net = self._net
        if net is None:
            raise ModelNotReadyError(f"model '{self.name}' is not loaded")
        tensors = [b.tensor if isinstance(b, SegmentationInput) else b for b in batch]
        logits = self._forward(net, tensors)
        out: list[Any] = []
        with torch.inference_mode():
            for item, z in zip(batch, logits.unbind(0), strict=True):
                if isinstance(item, SegmentationInput):
                    out.append(logits_to_masks(z, item.size, item.threshold))
                else:
                    out.append(z.float().cpu())
        return out

    @property
    def version(self) -> str:
        return self._version

    @property
    def untrained(self) -> bool:
        return self._version == UNTRAINED

    @property
    def device(self) -> str:
        return self._device.device

    @property
    def precision(self) -> str:
        return self._outcome.precision if self._outcome.forward is not None else precision_of(self._net)

    @property
    def backend(self) -> str:
        return self._outcome.backend

    @property
    def runtime_note(self) -> str:
        return self._outcome.note

    @property
    def runtime_report(self) -> RuntimeReport | None:
        return self._outcome.report
