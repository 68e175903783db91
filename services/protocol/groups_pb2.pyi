from meshserve.protocol import grpc_service_pb2 as _grpc_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CountersRequest(_message.Message):
    __slots__ = ("interval_ms",)
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    def __init__(self, interval_ms: _Optional[int] = ...) -> None: ...

class RequestCounters(_message.Message):
    __slots__ = ("model_name", "model_version", "requests", "failures", "bucket_bounds_ms", "bucket_counts")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    BUCKET_BOUNDS_MS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_COUNTS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    requests: int
    failures: int
    bucket_bounds_ms: _containers.RepeatedScalarFieldContainer[float]
    bucket_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., requests: _Optional[int] = ..., failures: _Optional[int] = ..., bucket_bounds_ms: _Optional[_Iterable[float]] = ..., bucket_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class InferGroup(_message.Message):
    __slots__ = ("model_name", "items", "version", "timeout_us", "cancel_group_id", "group_id")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_US_FIELD_NUMBER: _ClassVar[int]
    CANCEL_GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    items: _containers.RepeatedCompositeFieldContainer[GroupItem]
    version: str
    timeout_us: int
    cancel_group_id: int
    group_id: int
    def __init__(self, model_name: _Optional[str] = ..., items: _Optional[_Iterable[_Union[GroupItem, _Mapping]]] = ..., version: _Optional[str] = ..., timeout_us: _Optional[int] = ..., cancel_group_id: _Optional[int] = ..., group_id: _Optional[int] = ...) -> None: ...

class GroupItem(_message.Message):
    __slots__ = ("request", "request_id", "timeout_us", "priority", "traceparent")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_US_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    request: _grpc_service_pb2.ModelInferRequest
    request_id: str
    timeout_us: int
    priority: int
    traceparent: str
    def __init__(self, request: _Optional[_Union[_grpc_service_pb2.ModelInferRequest, _Mapping]] = ..., request_id: _Optional[str] = ..., timeout_us: _Optional[int] = ..., priority: _Optional[int] = ..., traceparent: _Optional[str] = ...) -> None: ...

class InferGroupResult(_message.Message):
    __slots__ = ("results", "items", "partial_group_id", "group_id")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ItemResult]
    items: _containers.RepeatedScalarFieldContainer[int]
    partial_group_id: int
    group_id: int
    def __init__(self, results: _Optional[_Iterable[_Union[ItemResult, _Mapping]]] = ..., items: _Optional[_Iterable[int]] = ..., partial_group_id: _Optional[int] = ..., group_id: _Optional[int] = ...) -> None: ...

class ItemResult(_message.Message):
    __slots__ = ("response", "code", "message", "more")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    response: _grpc_service_pb2.ModelInferResponse
    code: int
    message: str
    more: bool
    def __init__(self, response: _Optional[_Union[_grpc_service_pb2.ModelInferResponse, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., more: bool = ...) -> None: ...
