from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_STAT: _ClassVar[Priority]
    PRIORITY_ROUTINE: _ClassVar[Priority]

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_UNLOADED: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_FAILED: _ClassVar[ModelState]

class VersionPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_POLICY_UNSPECIFIED: _ClassVar[VersionPolicy]
    VERSION_POLICY_LATEST: _ClassVar[VersionPolicy]
    VERSION_POLICY_PINNED: _ClassVar[VersionPolicy]
PRIORITY_UNSPECIFIED: Priority
PRIORITY_STAT: Priority
PRIORITY_ROUTINE: Priority
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_UNLOADED: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_FAILED: ModelState
VERSION_POLICY_UNSPECIFIED: VersionPolicy
VERSION_POLICY_LATEST: VersionPolicy
VERSION_POLICY_PINNED: VersionPolicy

class Image(_message.Message):
    __slots__ = ("data", "content_type")
    DATA_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    content_type: str
    def __init__(self, data: _Optional[bytes] = ..., content_type: _Optional[str] = ...) -> None: ...

class ImageMetadata(_message.Message):
    __slots__ = ("width", "height", "format", "bits_stored", "pixel_spacing_row_mm", "pixel_spacing_column_mm", "photometric_interpretation")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    BITS_STORED_FIELD_NUMBER: _ClassVar[int]
    PIXEL_SPACING_ROW_MM_FIELD_NUMBER: _ClassVar[int]
    PIXEL_SPACING_COLUMN_MM_FIELD_NUMBER: _ClassVar[int]
    PHOTOMETRIC_INTERPRETATION_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    format: str
    bits_stored: int
    pixel_spacing_row_mm: float
    pixel_spacing_column_mm: float
    photometric_interpretation: str
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., format: _Optional[str] = ..., bits_stored: _Optional[int] = ..., pixel_spacing_row_mm: _Optional[float] = ..., pixel_spacing_column_mm: _Optional[float] = ..., photometric_interpretation: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "untrained", "architecture", "state", "labels", "error", "device", "precision", "task", "model_card", "role", "traffic_percent", "shadow_percent", "version_policy", "memory_cpu_bytes", "memory_gpu_bytes", "gpu_allocated_delta_bytes", "backend", "runtime_note")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UNTRAINED_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODEL_CARD_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_PERCENT_FIELD_NUMBER: _ClassVar[int]
    VERSION_POLICY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CPU_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_GPU_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_ALLOCATED_DELTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_NOTE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    untrained: bool
    architecture: str
    state: ModelState
    labels: _containers.RepeatedScalarFieldContainer[str]
    error: str
    device: str
    precision: str
    task: str
    model_card: str
    role: str
    traffic_percent: float
    shadow_percent: float
    version_policy: str
    memory_cpu_bytes: int
    memory_gpu_bytes: int
    gpu_allocated_delta_bytes: int
    backend: str
    runtime_note: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., untrained: _Optional[bool] = ..., architecture: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., labels: _Optional[_Iterable[str]] = ..., error: _Optional[str] = ..., device: _Optional[str] = ..., precision: _Optional[str] = ..., task: _Optional[str] = ..., model_card: _Optional[str] = ..., role: _Optional[str] = ..., traffic_percent: _Optional[float] = ..., shadow_percent: _Optional[float] = ..., version_policy: _Optional[str] = ..., memory_cpu_bytes: _Optional[int] = ..., memory_gpu_bytes: _Optional[int] = ..., gpu_allocated_delta_bytes: _Optional[int] = ..., backend: _Optional[str] = ..., runtime_note: _Optional[str] = ...) -> None: ...

class FindingPerformance(_message.Message):
    __slots__ = ("finding", "auroc", "auroc_ci_low", "auroc_ci_high", "threshold", "sensitivity", "specificity", "positives", "negatives")
    FINDING_FIELD_NUMBER: _ClassVar[int]
    AUROC_FIELD_NUMBER: _ClassVar[int]
    AUROC_CI_LOW_FIELD_NUMBER: _ClassVar[int]
    AUROC_CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SENSITIVITY_FIELD_NUMBER: _ClassVar[int]
    SPECIFICITY_FIELD_NUMBER: _ClassVar[int]
    POSITIVES_FIELD_NUMBER: _ClassVar[int]
    NEGATIVES_FIELD_NUMBER: _ClassVar[int]
    finding: str
    auroc: float
    auroc_ci_low: float
    auroc_ci_high: float
    threshold: float
    sensitivity: float
    specificity: float
    positives: int
    negatives: int
    def __init__(self, finding: _Optional[str] = ..., auroc: _Optional[float] = ..., auroc_ci_low: _Optional[float] = ..., auroc_ci_high: _Optional[float] = ..., threshold: _Optional[float] = ..., sensitivity: _Optional[float] = ..., specificity: _Optional[float] = ..., positives: _Optional[int] = ..., negatives: _Optional[int] = ...) -> None: ...

class ModelEvaluation(_message.Message):
    __slots__ = ("model_version", "dataset_sha256", "dataset_images", "evaluated_at", "findings", "macro_auroc", "notes", "classes", "macro_dice")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATASET_SHA256_FIELD_NUMBER: _ClassVar[int]
    DATASET_IMAGES_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    MACRO_AUROC_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MACRO_DICE_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    dataset_sha256: str
    dataset_images: int
    evaluated_at: str
    findings: _containers.RepeatedCompositeFieldContainer[FindingPerformance]
    macro_auroc: float
    notes: _containers.RepeatedScalarFieldContainer[str]
    classes: _containers.RepeatedCompositeFieldContainer[ClassSegmentationPerformance]
    macro_dice: float
    def __init__(self, model_version: _Optional[str] = ..., dataset_sha256: _Optional[str] = ..., dataset_images: _Optional[int] = ..., evaluated_at: _Optional[str] = ..., findings: _Optional[_Iterable[_Union[FindingPerformance, _Mapping]]] = ..., macro_auroc: _Optional[float] = ..., notes: _Optional[_Iterable[str]] = ..., classes: _Optional[_Iterable[_Union[ClassSegmentationPerformance, _Mapping]]] = ..., macro_dice: _Optional[float] = ...) -> None: ...

class ClassSegmentationPerformance(_message.Message):
    __slots__ = ("class_name", "images", "dice_mean", "dice_ci_low", "dice_ci_high", "hd95_images", "hd95_mean", "hd95_ci_low", "hd95_ci_high")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    DICE_MEAN_FIELD_NUMBER: _ClassVar[int]
    DICE_CI_LOW_FIELD_NUMBER: _ClassVar[int]
    DICE_CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    HD95_IMAGES_FIELD_NUMBER: _ClassVar[int]
    HD95_MEAN_FIELD_NUMBER: _ClassVar[int]
    HD95_CI_LOW_FIELD_NUMBER: _ClassVar[int]
    HD95_CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    images: int
    dice_mean: float
    dice_ci_low: float
    dice_ci_high: float
    hd95_images: int
    hd95_mean: float
    hd95_ci_low: float
    hd95_ci_high: float
    def __init__(self, class_name: _Optional[str] = ..., images: _Optional[int] = ..., dice_mean: _Optional[float] = ..., dice_ci_low: _Optional[float] = ..., dice_ci_high: _Optional[float] = ..., hd95_images: _Optional[int] = ..., hd95_mean: _Optional[float] = ..., hd95_ci_low: _Optional[float] = ..., hd95_ci_high: _Optional[float] = ...) -> None: ...

class ModelCard(_message.Message):
    __slots__ = ("name", "version", "architecture", "labels", "task", "untrained", "preprocessing", "intended_use", "training_data", "regulatory_status", "evaluation", "evaluation_note", "source", "conflicts", "digest")
    class PreprocessingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    UNTRAINED_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    INTENDED_USE_FIELD_NUMBER: _ClassVar[int]
    TRAINING_DATA_FIELD_NUMBER: _ClassVar[int]
    REGULATORY_STATUS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_NOTE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CONFLICTS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    architecture: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    task: str
    untrained: bool
    preprocessing: _containers.ScalarMap[str, str]
    intended_use: str
    training_data: str
    regulatory_status: str
    evaluation: ModelEvaluation
    evaluation_note: str
    source: str
    conflicts: _containers.RepeatedScalarFieldContainer[str]
    digest: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., architecture: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., task: _Optional[str] = ..., untrained: _Optional[bool] = ..., preprocessing: _Optional[_Mapping[str, str]] = ..., intended_use: _Optional[str] = ..., training_data: _Optional[str] = ..., regulatory_status: _Optional[str] = ..., evaluation: _Optional[_Union[ModelEvaluation, _Mapping]] = ..., evaluation_note: _Optional[str] = ..., source: _Optional[str] = ..., conflicts: _Optional[_Iterable[str]] = ..., digest: _Optional[str] = ...) -> None: ...
