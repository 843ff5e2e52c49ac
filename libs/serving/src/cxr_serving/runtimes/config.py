"""`models.<name>.runtime`: which backend and precision a model's forward runs in, validated at config load
so an unsupported pair stops the service with a message instead of being accepted and ignored."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Backend = Literal["torch", "openvino", "onnxruntime", "tensorrt"]
Precision = Literal["float32", "bfloat16", "float16", "int8"]

# What each backend can run here, and why not the rest (the message a refused pair gets).
SUPPORTED: dict[str, dict[str, str]] = {
    "torch": {
        "float32": "",
        "bfloat16": "torch serves bfloat16 through performance.use_amp (autocast), not runtime.precision",
        "float16": "torch serves float16 through performance.use_amp with amp_dtype float16 on a GPU",
        "int8": "torch has no int8 path here: use backend openvino or onnxruntime",
    },
    "openvino": {
        "float32": "",
        "bfloat16": "",
        "float16": "OpenVINO's CPU plugin computes float16 only on CPUs with AVX512-FP16/AMX-FP16: use bfloat16",
        "int8": "",
    },
    "onnxruntime": {
        "float32": "",
        "bfloat16": "ONNX Runtime's CPU execution provider has no bfloat16 kernels: use backend openvino",
        "float16": "ONNX Runtime's CPU execution provider has no float16 convolutions: use backend openvino",
        "int8": "",
    },
    "tensorrt": {
        "float32": "",
        "bfloat16": "TensorRT serves float16 here: set precision float16",
        "float16": "",
        "int8": "",
    },
}

DEFAULT_CACHE_DIR = Path("var/cache/model-runtimes")
DEFAULT_CALIBRATION = Path("data/cxr14-sample/images")  # under the shared data directory


class RuntimeConfig(BaseModel):
    """The runtime of one model: backend, precision, export cache, calibration images and the load-time check."""

    model_config = ConfigDict(extra="forbid")

    backend: Backend = Field("torch", description="torch (default), openvino, onnxruntime or tensorrt (GPU)")
    precision: Precision = Field(
        "float32",
        description="float32; bfloat16 (openvino); float16 (tensorrt); int8 (openvino, onnxruntime, tensorrt: "
        "post-training static quantization on calibration_dir)",
    )
    cache_dir: Path | None = Field(
        None,
        description="where exported networks are kept, keyed by weights, preprocessing, backend, precision, input "
        "shape and library versions (default var/cache/model-runtimes under data_path); a restart reuses them",
    )
    calibration_dir: Path | None = Field(
        None,
        description="folder of PNG/JPEG/DICOM images: int8 calibrates on one part, the load-time check runs on "
        "another (default: the shared NIH sample images, $CXR_SHARED_DIR or ../shared, data/cxr14-sample/images)",
    )
    calibration_images: int = Field(64, ge=1, le=10_000, description="images int8 calibrates on")
    check_images: int = Field(100, ge=1, le=10_000, description="held-back images the load-time check runs on")
    int8_float_layers: list[str] = Field(
        default_factory=list,
        description="int8 only: regular expressions matched at the start of the ONNX export's node names (e.g. "
        "'/net/decoder/', '/net/decoder/blocks\\.0/'; tensorrt matches the same names, its modules' ONNX scopes) "
        "that stay in float: float32 on openvino/onnxruntime, float16 on tensorrt; for layers whose int8 error the "
        "accuracy check refuses",
    )

    @model_validator(mode="after")
    def _supported(self) -> RuntimeConfig:
        why_not = SUPPORTED[self.backend][self.precision]
        if why_not:
            raise ValueError(f"backend {self.backend} with precision {self.precision} is not supported: {why_not}")
        if self.int8_float_layers and self.precision != "int8":
            raise ValueError(f"int8_float_layers applies to precision int8 only, not {self.precision}")
        for pattern in self.int8_float_layers:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"int8_float_layers: {pattern!r} is not a regular expression ({exc})") from None
        return self

    @property
    def is_torch(self) -> bool:
        return self.backend == "torch"


class ClassificationRuntimeConfig(RuntimeConfig):
    """A classifier's runtime, with the bounds its load-time check compares probabilities and calls by."""

    max_probability_delta: float = Field(0.02, gt=0, le=1, description="largest |Δp| allowed against float32 torch")
    min_agreement: float = Field(
        0.99, gt=0, le=1, description="least share of check images on which each finding is called alike"
    )


class SegmentationRuntimeConfig(RuntimeConfig):
    """A segmenter's runtime, with the bound its load-time check compares masks by."""

    min_dice: float = Field(0.98, gt=0, le=1, description="least mean Dice of each class's masks against float32")


@dataclass(frozen=True)
class ResolvedRuntime:
    """A RuntimeConfig with its directories made absolute against the settings."""

    config: RuntimeConfig
    cache_dir: Path
    calibration_dir: Path

    @property
    def backend(self) -> str:
        return self.config.backend

    @property
    def precision(self) -> str:
        return self.config.precision


def default_calibration_dir(environ: dict[str, str] | None = None) -> Path:
    """The shared NIH images, found as the tests and the config find the shared data: $CXR_SHARED_DIR, else
    ../shared beside the working directory."""
    env = os.environ if environ is None else environ
    shared = Path(env["CXR_SHARED_DIR"]) if env.get("CXR_SHARED_DIR") else Path("..") / "shared"
    return (shared / DEFAULT_CALIBRATION).resolve()


def resolve_runtime(config: RuntimeConfig, data_path: Path | None) -> ResolvedRuntime:
    """Relative directories start at `data_path` (else the working directory)."""

    def absolute(p: Path) -> Path:
        return (p if p.is_absolute() or data_path is None else data_path / p).resolve()

    cache = absolute(config.cache_dir or DEFAULT_CACHE_DIR)
    calibration = absolute(config.calibration_dir) if config.calibration_dir else default_calibration_dir()
    return ResolvedRuntime(config, cache, calibration)
