"""`ChestXrayClassifier`: one configured classifier as the serving runtime's `ServedModel`.

load: build the network -> load the checkpoint (or refuse unless allow_untrained) -> move to
the device (channels_last / compile on GPU) -> warm up. preprocess: decoded image -> input
tensor (per request, on the decode pool). predict: stack a batch, one forward pass under
inference_mode (+ AMP on GPU), probabilities in label order; Grad-CAM for the items that asked
for it (the batcher calls it on the model's own thread). postprocess: one output -> findings
with their thresholds and decisions. No gRPC here.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from cxr_classification.checkpoints import load_checkpoint
from cxr_classification.config import ClassifierConfig
from cxr_classification.gradcam import grad_cam, heatmap_png
from cxr_classification.networks import ClassifierNetwork, LogitsOf, build_network
from cxr_classification.preprocessing import IMAGENET_MEAN, IMAGENET_STD, XRV_RANGE, PreprocessSpec, preprocess
from cxr_serving.device import InferenceDevice, module_bytes
from cxr_serving.errors import CheckpointError, ModelNotReadyError
from cxr_serving.images import DecodedImage
from cxr_serving.lifecycle import UNTRAINED, ServedModel, ThresholdOverride
from cxr_serving.optimize.amp import precision_of
from cxr_serving.random_init import fixed_random_weights
from cxr_serving.runtimes.check import CheckResult, classification_check
from cxr_serving.runtimes.config import ResolvedRuntime
from cxr_serving.runtimes.prepare import RuntimeOutcome, RuntimeReport, RuntimeRequest, prepare_runtime, weights_digest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierInput:
    """One preprocessed image (C x S x S) and the labels to explain with Grad-CAM."""

    image: torch.Tensor
    heatmap_labels: tuple[str, ...] = ()


class Calibration(StrEnum):
    """What a label's probability is, which decides whether a threshold applies to it."""

    RAW = "raw"  # the model's own sigmoid/softmax output
    OPERATING_POINT = "operating_point"  # normalised so that the checkpoint's operating point is 0.5
    NO_OPERATING_POINT = "no_operating_point"  # raw sigmoid of a label the checkpoint has no operating point for


@dataclass(frozen=True)
class Decision:
    """How the loaded checkpoint's outputs are read: per label, the calibration and the threshold (NaN: none)."""

    calibration: tuple[Calibration, ...]
    thresholds: np.ndarray


@dataclass
class ClassifierOutput:
    """Probabilities in label order, how to read them, and PNG heatmaps by label when asked."""

    probabilities: np.ndarray
    decision: Decision
    heatmaps: dict[str, bytes] = field(default_factory=dict)

    @property
    def positive(self) -> np.ndarray:
        """Per label, probability >= threshold; never for a NaN threshold."""
        with np.errstate(invalid="ignore"):
            return self.probabilities >= self.decision.thresholds


class FindingResult(NamedTuple):
    """One label of one image: probability, the threshold it was compared with (NaN: none), the decision.
    A named tuple: one is made per label of every image, on the event loop."""

    label: str
    probability: float
    threshold: float
    positive: bool
    calibration: Calibration
    heatmap_png: bytes = b""


def output_index(cfg: ClassifierConfig) -> list[int]:
    """Which head outputs are the configured labels, in label order."""
    labels = cfg.output_labels
    if cfg.checkpoint_labels is not None:
        return [cfg.checkpoint_labels.index(label) for label in labels]
    if cfg.activation == "softmax" and cfg.head_size == 2 and len(labels) == 1:
        return [1]  # binary softmax head: [normal, abnormal]
    return list(range(len(labels)))


def check_operating_points(op_threshs: torch.Tensor, cfg: ClassifierConfig, path: Path | None) -> None:
    """Refuse operating points outside (0, 1): one <= 0 maps every probability to >= 0.5 (that label
    positive on every image), one >= 1 or inf maps them below it; NaN means none and is allowed."""
    names = cfg.checkpoint_labels or []
    bad = [
        f"{names[i] if i < len(names) else f'output {i}'}={v!r}"
        for i, v in enumerate(op_threshs.reshape(-1).tolist())
        if not math.isnan(v) and not 0.0 < v < 1.0
    ]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} has operating points (op_threshs) outside (0, 1): {', '.join(bad)}; "
            "each must be a probability strictly between 0 and 1, or NaN for a label without one"
        )


class ChestXrayClassifier(ServedModel):
    accepts_thresholds = True

    def __init__(
        self,
        name: str,
        cfg: ClassifierConfig,
        device: InferenceDevice,
        *,
        checkpoint_path: Path | None = None,
        warmup_batches: int = 1,
        max_batch_size: int = 1,
        runtime: ResolvedRuntime | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.architecture = cfg.architecture
        self.task = cfg.task
        self.spec = PreprocessSpec.from_config(cfg)  # models with equal specs share one preprocessed tensor
        self.labels = tuple(cfg.output_labels)
        self.thresholds = np.array([cfg.threshold(label) for label in self.labels], dtype=np.float32)
        named = cfg.thresholds if isinstance(cfg.thresholds, dict) else {}
        self._threshold_named = [label in named for label in self.labels]
        self._device = device
        self._configured_checkpoint = checkpoint_path
        self._warmup_batches = warmup_batches
        self._max_batch_size = max_batch_size
        self._version = ""
        self._checkpoint: Path | None = None
        self._network: ClassifierNetwork | None = None  # eager module (Grad-CAM)
        self._runner: Any = None  # what predict calls (compiled on GPU when configured)
        self._decision = self.decision(None)
        self._runtime = runtime
        self._outcome = RuntimeOutcome()  # what serves the forward (runtimes/prepare.py)
        self._lock = threading.Lock()

    @property
    def version(self) -> str:
        return self._version

    @property
    def device(self) -> str:
        return self._device.device

    @property
    def checkpoint(self) -> Path | None:
        return self._checkpoint

    @property
    def preprocessing(self) -> dict[str, str]:
        """The PreprocessSpec `preprocess` applies, with the normalisation's constants."""
        spec = self.spec
        out = {
            "input_size": f"{spec.input_size}x{spec.input_size}",
            "channels": str(spec.in_chans),
            "resize": spec.resize,
            "normalization": spec.normalization,
            "input": "grayscale in [0, 1] (DICOM LUTs applied, MONOCHROME1 inverted)",
        }
        if spec.normalization == "imagenet":
            mean: tuple[float, ...] = IMAGENET_MEAN
            std: tuple[float, ...] = IMAGENET_STD
            if spec.in_chans != 3:  # normalize_imagenet: grayscale uses their averages
                mean, std = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
            out["mean"] = ", ".join(f"{v:.4g}" for v in mean)
            out["std"] = ", ".join(f"{v:.4g}" for v in std)
        else:
            out["range"] = f"[-{XRV_RANGE:g}, {XRV_RANGE:g}]"
        return out

    @property
    def precision(self) -> str:
        return self._outcome.precision if self._outcome.forward is not None else precision_of(self._runner)

    @property
    def backend(self) -> str:
        return self._outcome.backend

    @property
    def runtime_note(self) -> str:
        return self._outcome.note

    @property
    def runtime_report(self) -> RuntimeReport | None:
        return self._outcome.report

    @property
    def loaded(self) -> bool:
        return self._runner is not None

    def build(self, checkpoint_path: Path | None) -> tuple[ClassifierNetwork, str]:
        """The network with its weights, and its version; raises CheckpointError."""
        cfg = self.cfg
        with fixed_random_weights(cfg.seed):  # untrained: the same random weights in every instance and on every reload
            net = build_network(cfg)
        op_threshs = None
        if checkpoint_path is not None:
            ckpt = load_checkpoint(net, checkpoint_path, cfg.checkpoint_format, cfg.allow_pickle)
            op_threshs, version = ckpt.op_threshs, ckpt.version
        elif cfg.allow_untrained:
            version = UNTRAINED
        else:
            raise CheckpointError(
                f"models.{self.name}.checkpoint_path is not set; configure a checkpoint "
                "or set allow_untrained: true to serve random weights (every response then says 'untrained')",
                reason="CHECKPOINT_NOT_CONFIGURED",
            )
        if op_threshs is not None and op_threshs.numel() != cfg.head_size:
            raise CheckpointError(f"op_threshs has {op_threshs.numel()} values for a head of {cfg.head_size}")
        if op_threshs is not None:
            check_operating_points(op_threshs, cfg, checkpoint_path)
        index = output_index(cfg)
        network = ClassifierNetwork(net, activation=cfg.activation, output_index=index, op_threshs=op_threshs)
        return network.eval(), version

    def decision(
        self, has_operating_point: Sequence[bool] | None, override: ThresholdOverride | None = None
    ) -> Decision:
        """Calibration and threshold per label for a checkpoint with these operating points (None: none at all).

        Without operating points every label is compared with its configured threshold, or the
        `override`'s (LoadModel) for the labels it names. A label without an operating point in a
        checkpoint that calibrates the others is a raw sigmoid on another scale: it gets no threshold
        (never positive) unless `thresholds` or the override names it.
        """
        base, named_labels = self.thresholds, self._threshold_named
        if override is not None:
            base = np.array(
                [override.values.get(label, t) for label, t in zip(self.labels, base, strict=True)], dtype=np.float32
            )
            named_labels = [n or label in override.values for label, n in zip(self.labels, named_labels, strict=True)]
        if has_operating_point is None:
            return Decision((Calibration.RAW,) * len(self.labels), base)
        calibration = tuple(
            Calibration.OPERATING_POINT if has else Calibration.NO_OPERATING_POINT for has in has_operating_point
        )
        thresholds = np.array(
            [
                t if c is Calibration.OPERATING_POINT or named else np.nan
                for t, c, named in zip(base, calibration, named_labels, strict=True)
            ],
            dtype=np.float32,
        )
        return Decision(calibration, thresholds)

    def load(self, checkpoint_path: Path | None = None) -> None:
        self._load(checkpoint_path, None)

    def load_with(self, checkpoint_path: Path | None, thresholds: ThresholdOverride) -> None:
        """Load with LoadModel's thresholds, refusing a checkpoint of another version than they were chosen for."""
        self._load(checkpoint_path, thresholds)

    def _load(self, checkpoint_path: Path | None, override: ThresholdOverride | None) -> None:
        path = checkpoint_path or self._configured_checkpoint
        network, version = self.build(path)
        if override is not None and override.model_version != version:
            raise CheckpointError(
                f"model '{self.name}': the thresholds were chosen for version {override.model_version!r}, "
                f"but the checkpoint loaded is version {version!r}; choose thresholds for this version "
                "(cxr evaluate --choose-thresholds)",
                reason="THRESHOLDS_VERSION_MISMATCH",
            )
        decision = self.decision(network.has_operating_point(), override)
        missing = [
            label
            for label, c in zip(self.labels, decision.calibration, strict=True)
            if c is Calibration.NO_OPERATING_POINT
        ]
        if missing:
            log.warning(
                "model '%s': checkpoint has no operating point for %s: raw probabilities, never positive "
                "unless models.%s.thresholds names the label",
                self.name,
                missing,
                self.name,
            )
        outcome = self._prepare_runtime(network, version, decision)
        network = network.to(self._device.device)
        c, s = int(self.cfg.in_chans or 3), self.cfg.input_size
        example = torch.rand(1, c, s, s, generator=torch.Generator().manual_seed(0))
        runner: Any
        if outcome.forward is not None:  # warmed up inside prepare_runtime, where a failure falls back
            runner = _RuntimeRunner(network, outcome.forward)
        else:
            runner = self._device.prepare(network, example=example)  # `network` stays unfolded (Grad-CAM)
            self._warm_up(runner)
            outcome = outcome.torch_serves(precision_of(runner))
        with self._lock:
            self._network, self._runner, self._version, self._decision = network, runner, version, decision
            self._checkpoint = path if version != UNTRAINED else None
            self._outcome = outcome

    def runtime_identity(self, version: str, weights: str) -> dict[str, Any]:
        """What an exported network depends on besides the backend: checkpoint, weights, the config that shapes
        the graph, and the preprocessing int8 calibrated under (a new one must not reuse its scales)."""
        graph = self.cfg.model_dump(mode="json", include={"model_type", "timm_name", "in_chans", "input_size"})
        return {"version": version, "weights": weights, "graph": graph, "preprocessing": self.preprocessing}

    def _prepare_runtime(self, network: ClassifierNetwork, version: str, decision: Decision) -> RuntimeOutcome:
        """The configured runtime for this network (CPU float32 here), checked on probabilities and calls."""
        runtime = self._runtime
        if runtime is None or runtime.config.is_torch:
            return RuntimeOutcome()
        cfg = self.cfg
        max_delta, min_agreement = cfg.runtime.max_probability_delta, cfg.runtime.min_agreement

        def judge(reference: np.ndarray, got: np.ndarray) -> CheckResult:
            with torch.inference_mode():
                ref = network.probabilities(torch.from_numpy(reference)).numpy()
                out = network.probabilities(torch.from_numpy(got)).numpy()
            return classification_check(ref, out, decision.thresholds, max_delta, min_agreement)

        request = RuntimeRequest(
            self.name,
            LogitsOf(network),
            (int(cfg.in_chans or 3), cfg.input_size, cfg.input_size),
            self.runtime_identity(version, weights_digest(network.net)),
            self.preprocess,
            judge,
            transformer=cfg.model_type != "densenet121",
            max_batch_size=self._max_batch_size,
            warm_up=self._warm_up,
        )
        return prepare_runtime(runtime, request, device=self._device.device, tf32=self._device.tf32)

    def warmup_batch_sizes(self) -> list[int]:
        return self._device.warmup_batch_sizes(self._max_batch_size, self._warmup_batches)

    def _warm_up(self, runner: Any) -> None:
        shape = (int(self.cfg.in_chans or 3), self.cfg.input_size, self.cfg.input_size)
        self._device.warm_up(runner, shape, self._max_batch_size, self._warmup_batches)

    def preprocess(self, decoded: DecodedImage) -> torch.Tensor:
        """The decoded grayscale image as this network's C x S x S input (crop/resize/normalise by config)."""
        return preprocess(decoded.array, self.spec)

    def postprocess(self, output: ClassifierOutput, options: object = None) -> list[FindingResult]:
        """One image's output as findings in label order; a label without a threshold is never positive."""
        decision, heatmaps = output.decision, output.heatmaps
        return [
            FindingResult(label, p, t, positive, c, heatmaps.get(label, b"") if heatmaps else b"")
            for label, p, t, c, positive in zip(
                self.labels,
                output.probabilities.tolist(),  # Python floats and bools, converted in one call each
                decision.thresholds.tolist(),
                decision.calibration,
                output.positive.tolist(),
                strict=True,
            )
        ]

    def predict(self, batch: list[ClassifierInput]) -> Sequence[ClassifierOutput]:
        with self._lock:
            network, runner, decision = self._network, self._runner, self._decision
        if network is None or runner is None:
            raise ModelNotReadyError(f"model '{self.name}' is not loaded")
        x = self._device.stack_to_device([item.image for item in batch])
        with self._device.inference():
            probs = runner(x).float().cpu().numpy()
        outputs = [ClassifierOutput(probs[i], decision) for i in range(len(batch))]
        for i, item in enumerate(batch):
            if item.heatmap_labels:
                positions = [self.labels.index(label) for label in item.heatmap_labels]
                heads = [int(network.output_index[p]) for p in positions]
                maps = grad_cam(network, x[i], heads)
                outputs[i].heatmaps = {
                    label: heatmap_png(m) for label, m in zip(item.heatmap_labels, maps, strict=True)
                }
        return outputs

    def memory_bytes(self) -> dict[str, int]:
        """Parameter and buffer bytes of the loaded network (and of its runner, where that holds its own)."""
        with self._lock:
            return module_bytes(self._network, self._runner)

    def shadow_input(self, item: ClassifierInput) -> ClassifierInput:
        """A shadow run compares probabilities only: no Grad-CAM backward passes."""
        return ClassifierInput(item.image)

    def disagreement(
        self, serving: ClassifierOutput, candidate: ClassifierOutput
    ) -> dict[str, tuple[float, bool]] | None:
        """Per label, |Δp| and whether the decision differs (each output read with its own version's thresholds)."""
        deltas = np.abs(serving.probabilities.astype(np.float64) - candidate.probabilities.astype(np.float64))
        flips = serving.positive != candidate.positive
        return {label: (float(d), bool(f)) for label, d, f in zip(self.labels, deltas, flips, strict=True)}

    def unload(self) -> None:
        with self._lock:
            self._network = self._runner = None
            self._outcome = RuntimeOutcome()
            self._version, self._checkpoint = "", None
        gc.collect()
        if self._device.is_cuda:
            torch.cuda.empty_cache()


class _RuntimeRunner:
    """What `predict` calls when a model runtime serves: its forward (raw head outputs), then the
    activation, operating points and label selection in torch."""

    def __init__(self, network: ClassifierNetwork, forward: Any) -> None:
        self.network, self.forward = network, forward

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.probabilities(self.forward(x).to(x.device))
