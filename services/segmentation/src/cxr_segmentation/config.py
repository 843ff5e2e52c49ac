"""The segmentation models: every `models.<name>` entry whose `task` is segmentation (the legacy
`models.segmentation` needs no `task`), each validated by this schema through `Settings.model_section`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cxr_serving.runtimes.config import SegmentationRuntimeConfig

DEFAULT_CLASSES = ("left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle")

# torchxrayvision's ChestX-Det PSPNet (`xrv.baseline_models.chestx_det.PSPNet.targets`), in its output order.
XRV_PSPNET_CLASSES = (
    "left_clavicle",
    "right_clavicle",
    "left_scapula",
    "right_scapula",
    "left_lung",
    "right_lung",
    "left_hilus_pulmonis",
    "right_hilus_pulmonis",
    "heart",
    "aorta",
    "facies_diaphragmatica",
    "mediastinum",
    "weasand",
    "spine",
)
XRV_PSPNET_INPUT_SIZE = 512

Normalization = Literal["imagenet", "unit", "xrv"]
CheckpointFormat = Literal["auto", "xrv_pspnet"]


class SegmentationConfig(BaseModel):
    """One segmentation model.

    `checkpoint_format`:
      - "auto": a segmentation-models-pytorch network (`architecture` + `encoder`), weights from a
        plain state_dict, a training dict (`state_dict`/`model`/`model_state_dict`), with or without
        `module.` prefixes, or a `.safetensors` file.
      - "xrv_pspnet": torchxrayvision's ChestX-Det PSPNet layout (14 anatomical targets, 512x512,
        ImageNet normalisation); `architecture`/`encoder` are ignored.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    task: Literal["segmentation"] = "segmentation"
    name: str = Field(
        "segmentation", min_length=1, description="model name in ListModels and requests (default: the entry's key)"
    )
    checkpoint_path: str | None = Field(None, description="relative paths start at models_path")
    allow_untrained: bool = Field(False, description="serve random weights when no checkpoint (dev only)")
    checkpoint_format: CheckpointFormat = "auto"
    architecture: str = Field("Unet", description="smp architecture: Unet, UnetPlusPlus, FPN, DeepLabV3Plus, ...")
    encoder: str = Field("resnet34", description="smp encoder name (built without pretrained weights)")
    classes: list[str] = Field(default_factory=lambda: list(DEFAULT_CLASSES), min_length=1)
    in_channels: Literal[1, 3] = 3
    input_size: int = Field(512, ge=32, le=2048, description="square network input; a multiple of 32")
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    normalization: Normalization = "imagenet"
    overlay_max_side: int = Field(1024, ge=64, le=8192, description="overlay PNGs are scaled down to this side")
    max_batch_size: int | None = Field(
        None, ge=1, le=1024, description="this model's batch limit (default: server_config.max_batch_size)"
    )
    max_batch_delay_ms: float | None = Field(None, ge=0, le=10_000, description="default: server_config's")
    masks_on_device: bool | None = Field(
        None,
        description="upsample + threshold inside the batch on the inference device (default: on for CUDA, off on "
        "CPU, where the decode pool parallelises it across requests)",
    )
    seed: int = Field(0, description="seed of the random weights of an untrained model")
    runtime: SegmentationRuntimeConfig = Field(
        default_factory=SegmentationRuntimeConfig,  # type: ignore[arg-type]
        description="what runs the forward: backend torch|openvino|onnxruntime|tensorrt and precision "
        "float32|bfloat16|float16|int8, exported once per checkpoint into a cache and checked against float32 "
        "torch at load (docs/model-runtimes.md)",
    )

    @field_validator("input_size")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v % 32:
            raise ValueError("must be a multiple of 32 (encoder downsampling)")
        return v

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("class names must be unique")
        if any(not c.strip() for c in v):
            raise ValueError("class names must not be empty")
        return v

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, v: str) -> str:
        import segmentation_models_pytorch as smp

        archs = {a.__name__.lower(): a.__name__ for a in smp.__dict__.values() if _is_smp_arch(a)}
        if v.lower() not in archs:
            raise ValueError(f"unknown smp architecture '{v}'; known: {sorted(archs.values())}")
        return str(archs[v.lower()])

    @model_validator(mode="after")
    def _xrv_layout(self) -> SegmentationConfig:
        if self.checkpoint_format == "xrv_pspnet":
            if "classes" not in self.model_fields_set:
                self.classes = list(XRV_PSPNET_CLASSES)
            elif len(self.classes) != len(XRV_PSPNET_CLASSES):
                raise ValueError(
                    f"classes: xrv_pspnet has {len(XRV_PSPNET_CLASSES)} outputs, got {len(self.classes)} names"
                )
            if "input_size" not in self.model_fields_set:
                self.input_size = XRV_PSPNET_INPUT_SIZE
            self.in_channels = 3
            self.normalization = "imagenet"
        return self


def _is_smp_arch(obj: object) -> bool:
    import torch

    return (
        isinstance(obj, type)
        and issubclass(obj, torch.nn.Module)
        and obj.__module__.startswith("segmentation_models_pytorch.decoders")
    )
