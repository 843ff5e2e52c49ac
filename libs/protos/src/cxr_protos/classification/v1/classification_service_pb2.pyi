from cxr_protos.common.v1 import access_pb2 as _access_pb2
from cxr_protos.common.v1 import common_pb2 as _common_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Calibration(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CALIBRATION_UNSPECIFIED: _ClassVar[Calibration]
    CALIBRATION_RAW: _ClassVar[Calibration]
    CALIBRATION_OPERATING_POINT: _ClassVar[Calibration]
    CALIBRATION_NO_OPERATING_POINT: _ClassVar[Calibration]
CALIBRATION_UNSPECIFIED: Calibration
CALIBRATION_RAW: Calibration
CALIBRATION_OPERATING_POINT: Calibration
CALIBRATION_NO_OPERATING_POINT: Calibration

class ClassifyImageRequest(_message.Message):
    __slots__ = ("image", "model_names", "heatmap_labels", "model_version", "priority")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_LABELS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.Image
    model_names: _containers.RepeatedScalarFieldContainer[str]
    heatmap_labels: _containers.RepeatedScalarFieldContainer[str]
    model_version: str
    priority: _common_pb2.Priority
    def __init__(self, image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., model_names: _Optional[_Iterable[str]] = ..., heatmap_labels: _Optional[_Iterable[str]] = ..., model_version: _Optional[str] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ...) -> None: ...

class Finding(_message.Message):
    __slots__ = ("label", "probability", "threshold", "positive", "heatmap_png", "calibration")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_PNG_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    threshold: float
    positive: bool
    heatmap_png: bytes
    calibration: Calibration
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ..., threshold: _Optional[float] = ..., positive: _Optional[bool] = ..., heatmap_png: _Optional[bytes] = ..., calibration: _Optional[_Union[Calibration, str]] = ...) -> None: ...

class ModelPrediction(_message.Message):
    __slots__ = ("model", "findings", "inference_ms")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    findings: _containers.RepeatedCompositeFieldContainer[Finding]
    inference_ms: float
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., findings: _Optional[_Iterable[_Union[Finding, _Mapping]]] = ..., inference_ms: _Optional[float] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("decode_ms", "preprocess_ms", "inference_ms", "total_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    preprocess_ms: float
    inference_ms: float
    total_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., preprocess_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class ClassifyImageResponse(_message.Message):
    __slots__ = ("predictions", "image", "untrained", "timing")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    UNTRAINED_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[ModelPrediction]
    image: _common_pb2.ImageMetadata
    untrained: bool
    timing: Timing
    def __init__(self, predictions: _Optional[_Iterable[_Union[ModelPrediction, _Mapping]]] = ..., image: _Optional[_Union[_common_pb2.ImageMetadata, _Mapping]] = ..., untrained: _Optional[bool] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class ClassifyImagesRequest(_message.Message):
    __slots__ = ("images", "model_names", "heatmap_labels", "model_version", "priority")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_LABELS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    model_names: _containers.RepeatedScalarFieldContainer[str]
    heatmap_labels: _containers.RepeatedScalarFieldContainer[str]
    model_version: str
    priority: _common_pb2.Priority
    def __init__(self, images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., model_names: _Optional[_Iterable[str]] = ..., heatmap_labels: _Optional[_Iterable[str]] = ..., model_version: _Optional[str] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ...) -> None: ...

class ImageClassification(_message.Message):
    __slots__ = ("index", "predictions", "image", "error", "timing")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    index: int
    predictions: _containers.RepeatedCompositeFieldContainer[ModelPrediction]
    image: _common_pb2.ImageMetadata
    error: _status_pb2.Status
    timing: Timing
    def __init__(self, index: _Optional[int] = ..., predictions: _Optional[_Iterable[_Union[ModelPrediction, _Mapping]]] = ..., image: _Optional[_Union[_common_pb2.ImageMetadata, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class ClassifyImagesResponse(_message.Message):
    __slots__ = ("results", "untrained")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    UNTRAINED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ImageClassification]
    untrained: bool
    def __init__(self, results: _Optional[_Iterable[_Union[ImageClassification, _Mapping]]] = ..., untrained: _Optional[bool] = ...) -> None: ...

class StreamClassifyImagesRequest(_message.Message):
    __slots__ = ("images", "model_names", "heatmap_labels", "model_version", "priority")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_LABELS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    model_names: _containers.RepeatedScalarFieldContainer[str]
    heatmap_labels: _containers.RepeatedScalarFieldContainer[str]
    model_version: str
    priority: _common_pb2.Priority
    def __init__(self, images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., model_names: _Optional[_Iterable[str]] = ..., heatmap_labels: _Optional[_Iterable[str]] = ..., model_version: _Optional[str] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ...) -> None: ...

class StreamClassifyImagesResponse(_message.Message):
    __slots__ = ("result", "untrained")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    UNTRAINED_FIELD_NUMBER: _ClassVar[int]
    result: ImageClassification
    untrained: bool
    def __init__(self, result: _Optional[_Union[ImageClassification, _Mapping]] = ..., untrained: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model_name", "checkpoint_path", "thresholds", "thresholds_model_version", "side_by_side")
    class ThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SIDE_BY_SIDE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    checkpoint_path: str
    thresholds: _containers.ScalarMap[str, float]
    thresholds_model_version: str
    side_by_side: bool
    def __init__(self, model_name: _Optional[str] = ..., checkpoint_path: _Optional[str] = ..., thresholds: _Optional[_Mapping[str, float]] = ..., thresholds_model_version: _Optional[str] = ..., side_by_side: _Optional[bool] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class GetModelCardRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class GetModelCardResponse(_message.Message):
    __slots__ = ("card",)
    CARD_FIELD_NUMBER: _ClassVar[int]
    card: _common_pb2.ModelCard
    def __init__(self, card: _Optional[_Union[_common_pb2.ModelCard, _Mapping]] = ...) -> None: ...

class RecordModelEvaluationRequest(_message.Message):
    __slots__ = ("model_name", "evaluation")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    evaluation: _common_pb2.ModelEvaluation
    def __init__(self, model_name: _Optional[str] = ..., evaluation: _Optional[_Union[_common_pb2.ModelEvaluation, _Mapping]] = ...) -> None: ...

class RecordModelEvaluationResponse(_message.Message):
    __slots__ = ("card",)
    CARD_FIELD_NUMBER: _ClassVar[int]
    card: _common_pb2.ModelCard
    def __init__(self, card: _Optional[_Union[_common_pb2.ModelCard, _Mapping]] = ...) -> None: ...

class PromoteModelRequest(_message.Message):
    __slots__ = ("model_name", "version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class PromoteModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class RollbackModelRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class RollbackModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class SetModelRoutingRequest(_message.Message):
    __slots__ = ("model_name", "candidate_version", "canary_percent", "shadow_percent", "version_policy")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_PERCENT_FIELD_NUMBER: _ClassVar[int]
    VERSION_POLICY_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    candidate_version: str
    canary_percent: float
    shadow_percent: float
    version_policy: _common_pb2.VersionPolicy
    def __init__(self, model_name: _Optional[str] = ..., candidate_version: _Optional[str] = ..., canary_percent: _Optional[float] = ..., shadow_percent: _Optional[float] = ..., version_policy: _Optional[_Union[_common_pb2.VersionPolicy, str]] = ...) -> None: ...

class SetModelRoutingResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ...) -> None: ...
