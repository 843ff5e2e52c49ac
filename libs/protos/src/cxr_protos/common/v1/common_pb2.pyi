from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_UNLOADED: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_FAILED: _ClassVar[ModelState]
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_UNLOADED: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_FAILED: ModelState

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
    __slots__ = ("name", "version", "untrained", "architecture", "state", "labels", "error", "device", "precision", "task")
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
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., untrained: _Optional[bool] = ..., architecture: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., labels: _Optional[_Iterable[str]] = ..., error: _Optional[str] = ..., device: _Optional[str] = ..., precision: _Optional[str] = ..., task: _Optional[str] = ...) -> None: ...
