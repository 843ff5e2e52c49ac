from cxr_protos.common.v1 import access_pb2 as _access_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InstanceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTANCE_STATE_UNSPECIFIED: _ClassVar[InstanceState]
    INSTANCE_STATE_QUEUED: _ClassVar[InstanceState]
    INSTANCE_STATE_IN_PROGRESS: _ClassVar[InstanceState]
    INSTANCE_STATE_DONE: _ClassVar[InstanceState]
    INSTANCE_STATE_DEAD: _ClassVar[InstanceState]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_STAT: _ClassVar[Priority]
    PRIORITY_ROUTINE: _ClassVar[Priority]
INSTANCE_STATE_UNSPECIFIED: InstanceState
INSTANCE_STATE_QUEUED: InstanceState
INSTANCE_STATE_IN_PROGRESS: InstanceState
INSTANCE_STATE_DONE: InstanceState
INSTANCE_STATE_DEAD: InstanceState
PRIORITY_UNSPECIFIED: Priority
PRIORITY_STAT: Priority
PRIORITY_ROUTINE: Priority

class InstanceStatus(_message.Message):
    __slots__ = ("sop_instance_uid", "series_instance_uid", "state", "priority", "attempts", "last_error")
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    sop_instance_uid: str
    series_instance_uid: str
    state: InstanceState
    priority: Priority
    attempts: int
    last_error: str
    def __init__(self, sop_instance_uid: _Optional[str] = ..., series_instance_uid: _Optional[str] = ..., state: _Optional[_Union[InstanceState, str]] = ..., priority: _Optional[_Union[Priority, str]] = ..., attempts: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...

class GetStudyStatusRequest(_message.Message):
    __slots__ = ("study_instance_uid",)
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    def __init__(self, study_instance_uid: _Optional[str] = ...) -> None: ...

class GetStudyStatusResponse(_message.Message):
    __slots__ = ("study_instance_uid", "queued", "in_progress", "done", "dead", "finished", "instances")
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    DEAD_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    queued: int
    in_progress: int
    done: int
    dead: int
    finished: bool
    instances: _containers.RepeatedCompositeFieldContainer[InstanceStatus]
    def __init__(self, study_instance_uid: _Optional[str] = ..., queued: _Optional[int] = ..., in_progress: _Optional[int] = ..., done: _Optional[int] = ..., dead: _Optional[int] = ..., finished: _Optional[bool] = ..., instances: _Optional[_Iterable[_Union[InstanceStatus, _Mapping]]] = ...) -> None: ...

class ListDeadLettersRequest(_message.Message):
    __slots__ = ("study_instance_uid",)
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    def __init__(self, study_instance_uid: _Optional[str] = ...) -> None: ...

class ListDeadLettersResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[InstanceStatus]
    def __init__(self, instances: _Optional[_Iterable[_Union[InstanceStatus, _Mapping]]] = ...) -> None: ...

class RetryDeadLetterRequest(_message.Message):
    __slots__ = ("sop_instance_uid",)
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    sop_instance_uid: str
    def __init__(self, sop_instance_uid: _Optional[str] = ...) -> None: ...

class RetryDeadLetterResponse(_message.Message):
    __slots__ = ("requeued",)
    REQUEUED_FIELD_NUMBER: _ClassVar[int]
    requeued: bool
    def __init__(self, requeued: _Optional[bool] = ...) -> None: ...
