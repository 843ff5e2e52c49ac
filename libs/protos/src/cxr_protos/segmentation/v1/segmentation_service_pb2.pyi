from cxr_protos.common.v1 import access_pb2 as _access_pb2
from cxr_protos.common.v1 import common_pb2 as _common_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MaskEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MASK_ENCODING_UNSPECIFIED: _ClassVar[MaskEncoding]
    MASK_ENCODING_PNG: _ClassVar[MaskEncoding]
    MASK_ENCODING_RLE: _ClassVar[MaskEncoding]
    MASK_ENCODING_NONE: _ClassVar[MaskEncoding]

class SpacingSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPACING_SOURCE_UNSPECIFIED: _ClassVar[SpacingSource]
    SPACING_SOURCE_NONE: _ClassVar[SpacingSource]
    SPACING_SOURCE_PIXEL_SPACING: _ClassVar[SpacingSource]
    SPACING_SOURCE_IMAGER_PIXEL_SPACING_CORRECTED: _ClassVar[SpacingSource]
    SPACING_SOURCE_IMAGER_PIXEL_SPACING_UNCORRECTED: _ClassVar[SpacingSource]
MASK_ENCODING_UNSPECIFIED: MaskEncoding
MASK_ENCODING_PNG: MaskEncoding
MASK_ENCODING_RLE: MaskEncoding
MASK_ENCODING_NONE: MaskEncoding
SPACING_SOURCE_UNSPECIFIED: SpacingSource
SPACING_SOURCE_NONE: SpacingSource
SPACING_SOURCE_PIXEL_SPACING: SpacingSource
SPACING_SOURCE_IMAGER_PIXEL_SPACING_CORRECTED: SpacingSource
SPACING_SOURCE_IMAGER_PIXEL_SPACING_UNCORRECTED: SpacingSource

class SegmentImageRequest(_message.Message):
    __slots__ = ("image", "model_name", "mask_encoding", "classes", "threshold", "include_overlay", "include_dicom_seg", "model_version", "priority")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MASK_ENCODING_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_OVERLAY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_DICOM_SEG_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.Image
    model_name: str
    mask_encoding: MaskEncoding
    classes: _containers.RepeatedScalarFieldContainer[str]
    threshold: float
    include_overlay: bool
    include_dicom_seg: bool
    model_version: str
    priority: _common_pb2.Priority
    def __init__(self, image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., model_name: _Optional[str] = ..., mask_encoding: _Optional[_Union[MaskEncoding, str]] = ..., classes: _Optional[_Iterable[str]] = ..., threshold: _Optional[float] = ..., include_overlay: _Optional[bool] = ..., include_dicom_seg: _Optional[bool] = ..., model_version: _Optional[str] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ...) -> None: ...

class RunLengthMask(_message.Message):
    __slots__ = ("size", "counts")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    size: _containers.RepeatedScalarFieldContainer[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, size: _Optional[_Iterable[int]] = ..., counts: _Optional[_Iterable[int]] = ...) -> None: ...

class BoundingBox(_message.Message):
    __slots__ = ("x_min", "y_min", "x_max", "y_max")
    X_MIN_FIELD_NUMBER: _ClassVar[int]
    Y_MIN_FIELD_NUMBER: _ClassVar[int]
    X_MAX_FIELD_NUMBER: _ClassVar[int]
    Y_MAX_FIELD_NUMBER: _ClassVar[int]
    x_min: int
    y_min: int
    x_max: int
    y_max: int
    def __init__(self, x_min: _Optional[int] = ..., y_min: _Optional[int] = ..., x_max: _Optional[int] = ..., y_max: _Optional[int] = ...) -> None: ...

class AnatomyMask(_message.Message):
    __slots__ = ("label", "width", "height", "png", "rle", "area_pixels", "area_mm2", "bounding_box")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    RLE_FIELD_NUMBER: _ClassVar[int]
    AREA_PIXELS_FIELD_NUMBER: _ClassVar[int]
    AREA_MM2_FIELD_NUMBER: _ClassVar[int]
    BOUNDING_BOX_FIELD_NUMBER: _ClassVar[int]
    label: str
    width: int
    height: int
    png: bytes
    rle: RunLengthMask
    area_pixels: int
    area_mm2: float
    bounding_box: BoundingBox
    def __init__(self, label: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., png: _Optional[bytes] = ..., rle: _Optional[_Union[RunLengthMask, _Mapping]] = ..., area_pixels: _Optional[int] = ..., area_mm2: _Optional[float] = ..., bounding_box: _Optional[_Union[BoundingBox, _Mapping]] = ...) -> None: ...

class Measurements(_message.Message):
    __slots__ = ("cardiothoracic_ratio", "cardiothoracic_ratio_unavailable_reason", "heart_width_px", "thorax_width_px", "heart_width_mm", "thorax_width_mm", "cardiothoracic_ratio_implausible")
    CARDIOTHORACIC_RATIO_FIELD_NUMBER: _ClassVar[int]
    CARDIOTHORACIC_RATIO_UNAVAILABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    HEART_WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    THORAX_WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    HEART_WIDTH_MM_FIELD_NUMBER: _ClassVar[int]
    THORAX_WIDTH_MM_FIELD_NUMBER: _ClassVar[int]
    CARDIOTHORACIC_RATIO_IMPLAUSIBLE_FIELD_NUMBER: _ClassVar[int]
    cardiothoracic_ratio: float
    cardiothoracic_ratio_unavailable_reason: str
    heart_width_px: float
    thorax_width_px: float
    heart_width_mm: float
    thorax_width_mm: float
    cardiothoracic_ratio_implausible: bool
    def __init__(self, cardiothoracic_ratio: _Optional[float] = ..., cardiothoracic_ratio_unavailable_reason: _Optional[str] = ..., heart_width_px: _Optional[float] = ..., thorax_width_px: _Optional[float] = ..., heart_width_mm: _Optional[float] = ..., thorax_width_mm: _Optional[float] = ..., cardiothoracic_ratio_implausible: _Optional[bool] = ...) -> None: ...

class SegmentImageResponse(_message.Message):
    __slots__ = ("model", "masks", "measurements", "overlay_png", "dicom_seg", "image", "untrained", "spacing_source", "magnification_factor")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    DICOM_SEG_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    UNTRAINED_FIELD_NUMBER: _ClassVar[int]
    SPACING_SOURCE_FIELD_NUMBER: _ClassVar[int]
    MAGNIFICATION_FACTOR_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    masks: _containers.RepeatedCompositeFieldContainer[AnatomyMask]
    measurements: Measurements
    overlay_png: bytes
    dicom_seg: bytes
    image: _common_pb2.ImageMetadata
    untrained: bool
    spacing_source: SpacingSource
    magnification_factor: float
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., masks: _Optional[_Iterable[_Union[AnatomyMask, _Mapping]]] = ..., measurements: _Optional[_Union[Measurements, _Mapping]] = ..., overlay_png: _Optional[bytes] = ..., dicom_seg: _Optional[bytes] = ..., image: _Optional[_Union[_common_pb2.ImageMetadata, _Mapping]] = ..., untrained: _Optional[bool] = ..., spacing_source: _Optional[_Union[SpacingSource, str]] = ..., magnification_factor: _Optional[float] = ...) -> None: ...

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
