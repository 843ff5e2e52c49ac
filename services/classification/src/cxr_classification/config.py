"""Configuration of the classifiers: every `models.<name>` entry whose `task` is a classification task.

`task` picks the schema (binary_classification: one positive label; multilabel_classification: one
sigmoid per label) and `architecture` the network; the legacy names `binary_classifier` and
`multiclass_classifier` default both (binary swin_transformer, multilabel densenet121), any other
entry declares them. Each section is validated by its schema through `Settings.model_section`, so a
typo or a bad value stops the service at start with a message naming the field.
Preprocessing (input size, resize, normalisation) is chosen here, by config, never guessed
from the image: CheXNet and timm checkpoints expect ImageNet mean/std on 3 channels,
torchxrayvision expects one channel scaled to [-1024, 1024].
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from cxr_serving.errors import ConfigError
from cxr_serving.model_tasks import BINARY_CLASSIFICATION, CLASSIFICATION_TASKS, MULTILABEL_CLASSIFICATION, model_tasks
from cxr_serving.runtimes.config import ClassificationRuntimeConfig
from cxr_serving.settings import Settings

BINARY_MODEL = "binary_classifier"
MULTILABEL_MODEL = "multiclass_classifier"

# NIH ChestX-ray14 findings in the NIH order (Wang et al. 2017; CheXNet's output order).
NIH_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
# Output order of every torchxrayvision DenseNet checkpoint (xrv.models.DenseNet.targets).
XRV_TARGETS: tuple[str, ...] = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
)
ABNORMAL = "abnormal"
DEFAULT_SWIN = "swin_tiny_patch4_window7_224"

ModelType = Literal["swin_transformer", "densenet121", "timm"]
ClassificationTask = Literal["binary_classification", "multilabel_classification"]
CheckpointFormat = Literal["auto", "state_dict", "training", "chexnet", "xrv", "timm", "safetensors"]
Normalization = Literal["imagenet", "xrv"]
ResizeMode = Literal["center_crop", "squash"]


class ClassifierConfig(BaseModel):
    """Fields shared by every classifier (weights, labels, serving and preprocessing)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    task: ClassificationTask
    checkpoint_path: str | None = Field(None, description="relative paths resolve against models_path")
    model_type: ModelType = Field(
        validation_alias=AliasChoices("architecture", "model_type"),
        description="the network (config key `architecture`; `model_type` is its deprecated spelling)",
    )
    timm_name: str | None = Field(None, description="timm architecture; required for architecture 'timm'")
    num_classes: int | None = Field(None, ge=1, le=1000)
    labels: list[str] | None = Field(None, description="output labels in order; defaults per model")
    allow_untrained: bool = Field(False, description="start with random weights when no checkpoint is set")
    seed: int = Field(0, description="seed of the random weights of an untrained model: every instance draws the same")
    checkpoint_format: CheckpointFormat = "auto"
    checkpoint_labels: list[str] | None = Field(
        None, description="output order of the checkpoint when it differs from `labels` (xrv: its 18 targets)"
    )
    allow_pickle: bool = Field(False, description="accept pickled whole models (torch.load weights_only=False)")
    input_size: int = Field(224, ge=32, le=2048)
    in_chans: Literal[1, 3] | None = Field(None, description="default: 1 for xrv normalisation, else 3")
    normalization: Normalization | None = Field(None, description="default: 'xrv' for xrv checkpoints, else 'imagenet'")
    resize: ResizeMode = Field("center_crop", description="crop the centred square then resize, or squash")
    output_activation: Literal["sigmoid", "softmax"] | None = Field(
        None, description="default: softmax for a 2-output binary head, else sigmoid"
    )
    max_batch_size: int | None = Field(
        None, ge=1, le=1024, description="this model's batch limit (default: server_config.max_batch_size)"
    )
    max_batch_delay_ms: float | None = Field(None, ge=0, le=10_000, description="default: server_config's")
    runtime: ClassificationRuntimeConfig = Field(
        default_factory=ClassificationRuntimeConfig,  # type: ignore[arg-type]
        description="what runs the forward: backend torch|openvino|onnxruntime|tensorrt and precision "
        "float32|bfloat16|float16|int8, exported once per checkpoint into a cache and checked against float32 "
        "torch at load (docs/model-runtimes.md)",
    )
    thresholds: float | dict[str, float] = Field(
        0.5,
        description="one threshold, or one per label; a label without an operating point in a checkpoint that "
        "has them (xrv) is never positive unless named here",
    )

    @model_validator(mode="before")
    @classmethod
    def _one_architecture_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "architecture" in data and "model_type" in data:
            raise ValueError("set `architecture` only: `model_type` is its deprecated spelling, not a second setting")
        return data

    @field_validator("thresholds")
    @classmethod
    def _threshold_range(cls, v: float | dict[str, float]) -> float | dict[str, float]:
        values = v.values() if isinstance(v, dict) else [v]
        if any(not 0.0 < t <= 1.0 for t in values):  # 0 (or below) would make a label positive on every image
            raise ValueError(
                "thresholds must be within (0, 1]: a threshold of 0 makes the label positive on every image"
            )
        return v

    @model_validator(mode="after")
    def _defaults(self) -> ClassifierConfig:
        if self.model_type == "timm" and not self.timm_name:
            raise ValueError("timm_name is required when architecture is 'timm'")
        if self.model_type == "swin_transformer" and self.timm_name is None:
            self.timm_name = DEFAULT_SWIN
        if self.checkpoint_format == "xrv" and self.model_type != "densenet121":
            raise ValueError("checkpoint_format 'xrv' needs model_type 'densenet121' (config key `architecture`)")
        if self.checkpoint_format == "chexnet" and self.model_type != "densenet121":
            raise ValueError("checkpoint_format 'chexnet' needs model_type 'densenet121' (config key `architecture`)")
        if self.normalization is None:
            self.normalization = "xrv" if self.checkpoint_format == "xrv" else "imagenet"
        if self.in_chans is None:
            self.in_chans = 1 if self.normalization == "xrv" else 3
        if self.checkpoint_format == "xrv" and self.checkpoint_labels is None:
            self.checkpoint_labels = list(XRV_TARGETS)
        self._apply_label_defaults()
        labels = self.output_labels
        if self.checkpoint_labels is not None:
            missing = [label for label in labels if label not in self.checkpoint_labels]
            if missing:
                raise ValueError(f"labels {missing} are not outputs of the checkpoint (checkpoint_labels)")
        if isinstance(self.thresholds, dict):
            unknown = sorted(set(self.thresholds) - set(labels))
            if unknown:
                raise ValueError(f"thresholds name unknown labels {unknown}; labels are {labels}")
        return self

    def _apply_label_defaults(self) -> None:
        """Overridden per model kind."""

    @property
    def output_labels(self) -> list[str]:
        assert self.labels is not None
        return list(self.labels)

    @property
    def head_size(self) -> int:
        """Number of outputs of the network's head (what the checkpoint holds)."""
        if self.checkpoint_labels is not None:
            return len(self.checkpoint_labels)
        assert self.num_classes is not None
        return self.num_classes

    @property
    def activation(self) -> str:
        if self.output_activation is not None:
            return self.output_activation
        return "sigmoid"

    def threshold(self, label: str) -> float:
        if isinstance(self.thresholds, dict):
            return self.thresholds.get(label, 0.5)
        return self.thresholds

    @property
    def architecture(self) -> str:
        """The concrete network served (ListModels): densenet121, or the timm model name."""
        return "densenet121" if self.model_type == "densenet121" else str(self.timm_name)


class BinaryClassifierConfig(ClassifierConfig):
    """Task binary_classification (`models.binary_classifier`: normal/abnormal): one positive label, one
    output (sigmoid) or two (softmax, index 1 = the positive label)."""

    task: Literal["binary_classification"] = BINARY_CLASSIFICATION
    model_type: ModelType = Field(
        "swin_transformer",
        validation_alias=AliasChoices("architecture", "model_type"),
        description="the network (config key `architecture`; `model_type` is its deprecated spelling)",
    )

    def _apply_label_defaults(self) -> None:
        if self.num_classes is None:
            self.num_classes = 1
        if self.num_classes not in (1, 2):
            raise ValueError("num_classes must be 1 (sigmoid) or 2 (softmax: [negative, positive]) for a binary model")
        if self.labels is None:
            self.labels = [ABNORMAL]
        if len(self.labels) != 1:
            raise ValueError("labels of a binary model is one label (the positive class), e.g. ['abnormal']")

    @property
    def head_size(self) -> int:
        assert self.num_classes is not None
        return self.num_classes

    @property
    def activation(self) -> str:
        if self.output_activation is not None:
            return self.output_activation
        return "softmax" if self.num_classes == 2 else "sigmoid"


class MultiLabelClassifierConfig(ClassifierConfig):
    """Task multilabel_classification (`models.multiclass_classifier`: the 14 NIH findings): one sigmoid
    per label; `labels` default to the NIH findings."""

    task: Literal["multilabel_classification"] = MULTILABEL_CLASSIFICATION
    model_type: ModelType = Field(
        "densenet121",
        validation_alias=AliasChoices("architecture", "model_type"),
        description="the network (config key `architecture`; `model_type` is its deprecated spelling)",
    )

    def _apply_label_defaults(self) -> None:
        if self.labels is None:
            if self.num_classes not in (None, len(NIH_LABELS)):
                raise ValueError(f"num_classes is {self.num_classes}: set `labels` to name each output")
            self.labels = list(NIH_LABELS)
        if self.num_classes is None:
            self.num_classes = len(self.labels)
        if self.checkpoint_labels is None and len(self.labels) != self.num_classes:
            raise ValueError(f"labels has {len(self.labels)} entries but num_classes is {self.num_classes}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")


TASK_SCHEMAS: dict[str, type[ClassifierConfig]] = {
    BINARY_CLASSIFICATION: BinaryClassifierConfig,
    MULTILABEL_CLASSIFICATION: MultiLabelClassifierConfig,
}


def classifier_configs(settings: Settings) -> dict[str, ClassifierConfig]:
    """Every `models.*` entry with a classification task, validated; raises ConfigError naming the field."""
    configs: dict[str, ClassifierConfig] = {}
    for name, task in model_tasks(settings, CLASSIFICATION_TASKS).items():
        section = settings.model_section(name, TASK_SCHEMAS[task])
        if section is not None:
            configs[name] = section
    if not configs:
        raise ConfigError(
            f"models: declare at least one classifier for the classification service: an entry with task "
            f"{' or '.join(CLASSIFICATION_TASKS)} (e.g. models.{BINARY_MODEL} or models.{MULTILABEL_MODEL})"
        )
    return configs
