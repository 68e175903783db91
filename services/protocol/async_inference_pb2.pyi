from meshserve.protocol import grpc_service_pb2 as _grpc_service_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitResponse(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ResultRequest(_message.Message):
    __slots__ = ("id", "wait_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    wait_ms: int
    def __init__(self, id: _Optional[str] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ResultResponse(_message.Message):
    __slots__ = ("id", "state", "response", "code", "message")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[ResultResponse.State]
        PENDING: _ClassVar[ResultResponse.State]
        RUNNING: _ClassVar[ResultResponse.State]
        DONE: _ClassVar[ResultResponse.State]
        FAILED: _ClassVar[ResultResponse.State]
        CANCELLED: _ClassVar[ResultResponse.State]
    STATE_UNSPECIFIED: ResultResponse.State
    PENDING: ResultResponse.State
    RUNNING: ResultResponse.State
    DONE: ResultResponse.State
    FAILED: ResultResponse.State
    CANCELLED: ResultResponse.State
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: ResultResponse.State
    response: _grpc_service_pb2.ModelInferResponse
    code: int
    message: str
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[ResultResponse.State, str]] = ..., response: _Optional[_Union[_grpc_service_pb2.ModelInferResponse, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
