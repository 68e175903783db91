from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReadinessRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Readiness(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[VersionReadiness]
    def __init__(self, versions: _Optional[_Iterable[_Union[VersionReadiness, _Mapping]]] = ...) -> None: ...

class VersionReadiness(_message.Message):
    __slots__ = ("model", "version", "weight", "ready", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    weight: int
    ready: bool
    reason: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., weight: _Optional[int] = ..., ready: bool = ..., reason: _Optional[str] = ...) -> None: ...

class PushModelRequest(_message.Message):
    __slots__ = ("name", "version", "artifact", "source", "notes", "encrypt", "config")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    ENCRYPT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    artifact: bytes
    source: str
    notes: str
    encrypt: bool
    config: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., artifact: _Optional[bytes] = ..., source: _Optional[str] = ..., notes: _Optional[str] = ..., encrypt: bool = ..., config: _Optional[str] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("name", "version", "digest", "signer", "manifest", "pushed_by", "pushed_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    PUSHED_BY_FIELD_NUMBER: _ClassVar[int]
    PUSHED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    digest: str
    signer: str
    manifest: str
    pushed_by: str
    pushed_at: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., digest: _Optional[str] = ..., signer: _Optional[str] = ..., manifest: _Optional[str] = ..., pushed_by: _Optional[str] = ..., pushed_at: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...

class ShowModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class FetchModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class FetchedModel(_message.Message):
    __slots__ = ("name", "version", "artifact", "manifest", "signature", "digest", "filename")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    artifact: bytes
    manifest: bytes
    signature: bytes
    digest: str
    filename: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., artifact: _Optional[bytes] = ..., manifest: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., digest: _Optional[str] = ..., filename: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("action", "subject", "reason", "details")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    action: str
    subject: str
    reason: str
    details: str
    def __init__(self, action: _Optional[str] = ..., subject: _Optional[str] = ..., reason: _Optional[str] = ..., details: _Optional[str] = ...) -> None: ...

class ShadowReport(_message.Message):
    __slots__ = ("model", "version", "compared", "differing", "max_abs_diff")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    DIFFERING_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    compared: int
    differing: int
    max_abs_diff: float
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., compared: _Optional[int] = ..., differing: _Optional[int] = ..., max_abs_diff: _Optional[float] = ...) -> None: ...

class Shadow(_message.Message):
    __slots__ = ("version", "percent")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    version: str
    percent: float
    def __init__(self, version: _Optional[str] = ..., percent: _Optional[float] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("model", "weights", "shadow", "region")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    model: str
    weights: _containers.ScalarMap[str, int]
    shadow: Shadow
    region: str
    def __init__(self, model: _Optional[str] = ..., weights: _Optional[_Mapping[str, int]] = ..., shadow: _Optional[_Union[Shadow, _Mapping]] = ..., region: _Optional[str] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("model", "version", "address", "region", "zone")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    address: str
    region: str
    zone: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., address: _Optional[str] = ..., region: _Optional[str] = ..., zone: _Optional[str] = ...) -> None: ...

class VersionStatus(_message.Message):
    __slots__ = ("version", "weight", "requests_per_second", "error_rate", "p50_ms", "p99_ms", "endpoints", "shadow")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    version: str
    weight: int
    requests_per_second: float
    error_rate: float
    p50_ms: float
    p99_ms: float
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    shadow: ShadowReport
    def __init__(self, version: _Optional[str] = ..., weight: _Optional[int] = ..., requests_per_second: _Optional[float] = ..., error_rate: _Optional[float] = ..., p50_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., shadow: _Optional[_Union[ShadowReport, _Mapping]] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("policy", "versions", "canary")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    policy: Policy
    versions: _containers.RepeatedCompositeFieldContainer[VersionStatus]
    canary: Canary
    def __init__(self, policy: _Optional[_Union[Policy, _Mapping]] = ..., versions: _Optional[_Iterable[_Union[VersionStatus, _Mapping]]] = ..., canary: _Optional[_Union[Canary, _Mapping]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("models", "snapshot_version")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    snapshot_version: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., snapshot_version: _Optional[str] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("policy", "reason", "expected", "force")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    policy: Policy
    reason: str
    expected: Policy
    force: bool
    def __init__(self, policy: _Optional[_Union[Policy, _Mapping]] = ..., reason: _Optional[str] = ..., expected: _Optional[_Union[Policy, _Mapping]] = ..., force: bool = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("model", "version", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("model", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class CanaryPlan(_message.Message):
    __slots__ = ("model", "to_version", "steps", "interval_seconds", "max_error_rate", "max_latency_ratio", "min_requests", "from_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_LATENCY_RATIO_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    to_version: str
    steps: _containers.RepeatedScalarFieldContainer[int]
    interval_seconds: float
    max_error_rate: float
    max_latency_ratio: float
    min_requests: int
    from_version: str
    def __init__(self, model: _Optional[str] = ..., to_version: _Optional[str] = ..., steps: _Optional[_Iterable[int]] = ..., interval_seconds: _Optional[float] = ..., max_error_rate: _Optional[float] = ..., max_latency_ratio: _Optional[float] = ..., min_requests: _Optional[int] = ..., from_version: _Optional[str] = ...) -> None: ...

class Canary(_message.Message):
    __slots__ = ("plan", "baseline", "state", "weight", "reason", "updated_at", "restore", "current", "baseline_by_weight")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    BASELINE_BY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    plan: CanaryPlan
    baseline: str
    state: str
    weight: int
    reason: str
    updated_at: str
    restore: Policy
    current: Policy
    baseline_by_weight: bool
    def __init__(self, plan: _Optional[_Union[CanaryPlan, _Mapping]] = ..., baseline: _Optional[str] = ..., state: _Optional[str] = ..., weight: _Optional[int] = ..., reason: _Optional[str] = ..., updated_at: _Optional[str] = ..., restore: _Optional[_Union[Policy, _Mapping]] = ..., current: _Optional[_Union[Policy, _Mapping]] = ..., baseline_by_weight: bool = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ("limit", "verify", "anchor", "after_seq")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    limit: int
    verify: bool
    anchor: str
    after_seq: int
    def __init__(self, limit: _Optional[int] = ..., verify: bool = ..., anchor: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("seq", "at", "actor", "action", "subject", "before", "after", "reason", "hash")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    seq: int
    at: str
    actor: str
    action: str
    subject: str
    before: str
    after: str
    reason: str
    hash: str
    def __init__(self, seq: _Optional[int] = ..., at: _Optional[str] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., subject: _Optional[str] = ..., before: _Optional[str] = ..., after: _Optional[str] = ..., reason: _Optional[str] = ..., hash: _Optional[str] = ...) -> None: ...

class AuditResponse(_message.Message):
    __slots__ = ("entries", "problems")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    problems: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ..., problems: _Optional[_Iterable[str]] = ...) -> None: ...
