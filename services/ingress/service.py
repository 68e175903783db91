"""The ingress: the public Open Inference Protocol endpoint.

Validates every request against its model's configuration, assigns a request id, carries
the client's deadline, and forwards groups of requests to the router over mutual TLS.
With `--policy`, every call is authenticated (client certificate on `--listen`, bearer
token on `--token-listen`) and authorized (see meshserve.ingress.auth).

`meshserve ingress --model-repository R --router HOST:PORT [--require-client-cert]
    [--token-listen HOST:PORT --policy FILE --jwks FILE|URL] [--http-listen HOST:PORT]`

One module of ~560 lines on purpose: it is the request path itself (each public RPC, from
the call's arrival to its group's answer) and reads best in one piece; everything that
stands apart from that path has its own module beside it (auth, quota, budget, denials,
readiness, ensembles, the HTTP/REST front, asynchronous submissions).
"""

import argparse
import asyncio
import itertools
import logging
import random
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from opentelemetry.trace import Span, SpanKind, StatusCode, set_span_in_context

from meshserve import __version__
from meshserve.common import runtime
from meshserve.common.access import PolicyFile
from meshserve.common.datatypes import WIRE_FROM_CONFIG
from meshserve.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServingError,
    Unimplemented,
    called_for_one_answer,
    from_code,
)
from meshserve.common.forwarding import (
    CODE_NAME,
    CODE_NUMBER,
    Entry,
    GroupForwarder,
    deadline_of,
    left_code,
    over_stream,
    raise_for,
)
from meshserve.common.http2_client import target_argument
from meshserve.common.http2_server import Unserved, server_ssl_context
from meshserve.common.log_settings import LogControl, LogSettings, fill_log_settings, log_updates
from meshserve.common.logs import (
    ACCESS_LOG,
    DEFAULT_ACCESS_LOG_MAX_PER_SECOND,
    DEFAULT_ACCESS_LOG_SAMPLE,
    LinesPerSecond,
    access_log,
    sample_fraction,
)
from meshserve.common.metrics import IngressMetrics, Metrics
from meshserve.common.priority import MAX_CARRIED
from meshserve.common.repository import ModelRepository
from meshserve.common.server import HealthServicer, Service, internal_error_message
from meshserve.common.stream_answers import EMPTY_FINAL_RESPONSE, FINAL_RESPONSE, error_text
from meshserve.common.tls import TlsFiles
from meshserve.common.trace_settings import (
    TraceControl,
    TraceSettings,
    fill_trace_settings,
    take_charge,
    trace_updates,
)
from meshserve.common.tracing import (
    TRACEPARENT,
    Tracing,
    context_of,
    header,
    traceparent_of,
)
from meshserve.common.upstream import Upstream
from meshserve.common.validation import Schema, expected_shape, integer_parameter
from meshserve.common.version_pin import PIN_HEADER
from meshserve.ingress import classification
from meshserve.ingress.async_service import (
    AsyncSettings,
    add_async_flags,
    async_settings,
    build_async,
)
from meshserve.ingress.audit_events import (
    LOG_SETTINGS_CHANGED,
    TRACE_SETTINGS_CHANGED,
    AuditEvents,
)
from meshserve.ingress.auth import Caller, Gate, OnDenied, OpenGate, shown
from meshserve.ingress.budget import ByteBudget
from meshserve.ingress.ensembles import EnsembleRunner
from meshserve.ingress.http_api import HttpSettings, add_http_flags, build_http, http_settings
from meshserve.ingress.readiness import RULES, STRICT, Readiness, follow, not_ready
from meshserve.ingress.saturation import EdgeBound
from meshserve.ingress.tokens import DEFAULT_AUDIENCE, DEFAULT_ISSUER, JwksUrl, jwks_source
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol import grpc_service_pb2_grpc, model_config_pb2
from meshserve.protocol.groups_pb2 import ItemResult

log = logging.getLogger(__name__)

T = TypeVar("T")

# Triton's names for what is served: "schedule_policy" is the `priority` and `timeout`
# request parameters, "parameters" a request's own parameters (a Python model reads them).
EXTENSIONS = ["classification", "model_configuration", "statistics", "repository_index",
              "streaming", "schedule_policy", "parameters", "logging", "trace"]
# Under load, a group may wait this long (and no longer than the last group's round trip) for
# the requests the ingress expects back (`GroupForwarder`).
DEFAULT_GROUP_LINGER_MS = 4.0


@dataclass(frozen=True)
class IngressSettings:
    listen: str
    tls: TlsFiles
    repository: Path
    router: str
    router_identity: str = "router"
    require_client_cert: bool = False
    access_log_sample: float = DEFAULT_ACCESS_LOG_SAMPLE
    access_log_max_per_second: int = DEFAULT_ACCESS_LOG_MAX_PER_SECOND  # 0: no limit
    # What its logging starts with (`--log-level`, `--log-format`); the log settings change it.
    log_level: str = "INFO"
    log_format: str = "json"
    asynchronous: AsyncSettings | None = None  # Submit/Result (None: not served)
    token_listen: str = ""  # server-TLS listener for bearer-token callers ("": none)
    token_port_file: Path | None = None
    policy: Path | None = None  # None: no authentication or authorization
    jwks: str = ""  # a JWKS file or http(s) URL
    token_issuer: str = DEFAULT_ISSUER
    token_audience: str = DEFAULT_AUDIENCE
    audit_denied_sample: float = 0.01
    # Where sampled denials are audited and versions' readiness is read ("": neither).
    control_plane: str = ""
    max_inflight_bytes: int = 256 << 20  # payload bytes of requests accepted, not yet answered
    # How long a group of requests under load may wait for more (see GroupForwarder); 0: never.
    group_linger_ms: float = DEFAULT_GROUP_LINGER_MS
    # ServerReady: every version the control plane's policies name can answer ("strict"),
    # or one can ("any"); needs `control_plane`.
    readiness: str = STRICT
    http: HttpSettings | None = None  # HTTP/REST beside gRPC (None: not served)


def parameter(request: pb.ModelInferRequest, name: str) -> int:
    """An integer request parameter (Triton's `priority`, `timeout` in µs); 0 when absent."""
    if name not in request.parameters:
        return 0
    value = integer_parameter(request.parameters[name])
    if value is None or value < 0:
        raise InvalidArgument(f"parameter '{name}' must be a non-negative integer")
    return value


class Ingress:
    """`metrics`, when given, is told of every answered request and every group sent:
    `metrics.request(model, version, code, seconds)` and `metrics.group.recorder(model)`.
    `tracing`, when given, traces each request (`ingress.request`, `ingress.validate`).
    Each failed request gets an access-log line, each answered one with probability
    `access_log_sample`, up to `access_log_max_per_second` lines in a second (0: no limit).
    Requests beyond `max_inflight_bytes` accepted and unanswered are refused (0: no limit),
    and so are those that would wait beyond their model's `max_queue_size` (`EdgeBound`).
    Groups under load linger up to `group_linger` seconds for more requests (`GroupForwarder`)."""

    def __init__(self, repository: ModelRepository, router: Upstream, metrics=None,
                 tracing: Tracing | None = None, access_log_sample: float = 0.0,
                 max_inflight_bytes: int = 0, readiness: Readiness | None = None,
                 group_linger: float = 0.0, access_log_max_per_second: int = 0) -> None:
        self.repository = repository
        self.readiness = readiness
        self.router = router
        self._metrics = metrics
        self._tracing = tracing
        self.access_log_sample = access_log_sample
        self._access_log_lines = LinesPerSecond(access_log_max_per_second)
        self._forwarders: dict[tuple[str, str], GroupForwarder] = {}
        self._group_linger = group_linger
        self._schemas: dict[str, Schema] = {}
        self._bounds: dict[str, EdgeBound] = {}
        self.budget = ByteBudget(max_inflight_bytes, "max_inflight_bytes")
        prefix = secrets.token_hex(4)  # ids unique across ingress replicas, cheap per request
        self._ids = (f"{prefix}-{n}" for n in itertools.count())
        self.ensembles = EnsembleRunner(repository, self.infer, self.answered)

    def _forwarder(self, model: str, version: str) -> GroupForwarder:
        """Requests pinned to a version travel in groups of their own."""
        forwarder = self._forwarders.get((model, version))
        if forwarder is None:
            observe = None if self._metrics is None else self._metrics.group.recorder(model)
            forwarder = GroupForwarder(over_stream(self.router.stream), model, "router",
                                       version=version, observe=observe,
                                       linger=self._group_linger)
            self._forwarders[model, version] = forwarder
        return forwarder

    def config(self, name: str, version: str):
        """The repository's entry of model `name`, for a question about `version` of it (""
        for none): NOT_FOUND for an unknown model or version, and, as Triton answers for a
        version that is not available, UNAVAILABLE saying why for a version its compute
        refused."""
        version = self.served_version(name, version)
        entry = self.repository.get(name)
        refused = self.refusal(entry.name, version) if version else ""
        if refused:
            raise not_ready(entry.name, version, refused)
        return entry

    def refusal(self, name: str, version: str) -> str:
        """Why a version cannot answer, as its compute said when it refused its model; ""
        when it can, nothing was said, or no control plane's table is followed."""
        return "" if self.readiness is None else self.readiness.refusal(name, version)

    def served_version(self, name: str, version: str) -> str:
        """The version a request for `version` of model `name` means, as the repository reads
        it ("02" and " 2" are "2"); "" stays "", the mesh's to choose. NOT_FOUND for an
        unknown model or version."""
        if version:
            return self.repository.version(name, version)
        self.repository.get(name)
        return ""

    async def infer(self, request: pb.ModelInferRequest, remaining: float | None,
                    traceparent: str = "", admit: Callable[[], None] | None = None,
                    partial: Callable[[ItemResult], None] | None = None
                    ) -> pb.ModelInferResponse:
        """`traceparent`: the client's W3C trace context (read only when tracing). `admit`,
        when given, authenticates and authorizes the caller (raising to refuse), first.
        `partial` hears of a decoupled model's answers before its last (the one returned);
        without it, a request for a decoupled model is refused."""
        if request.model_name in self.ensembles:  # its steps come back here, one by one
            return await self.ensembles.infer(request, remaining, traceparent, admit, partial)
        request_id = next(self._ids)
        if self._tracing is None:
            return await self._observed(request, remaining, request_id, None, admit, partial)
        span = self._tracing.start("ingress.request", context_of(traceparent),
                                   {"model": request.model_name}, kind=SpanKind.SERVER)
        try:
            response = await self._observed(request, remaining, request_id, span, admit,
                                            partial)
        except Exception as error:
            code = error.code if isinstance(error, ServingError) else "INTERNAL"
            span.set_attribute(GRPC_STATUS_ATTRIBUTE, CODE_NUMBER[code])
            span.record_exception(error)
            if code in SERVER_ERRORS:
                span.set_status(StatusCode.ERROR, str(error))
            raise
        else:
            span.set_attribute(GRPC_STATUS_ATTRIBUTE, 0)
            span.set_attribute("model.version", response.model_version)
            return response
        finally:
            span.end()

    async def _observed(self, request: pb.ModelInferRequest, remaining: float | None,
                        request_id: str, span: Span | None, admit: Callable[[], None] | None,
                        partial: Callable[[ItemResult], None] | None
                        ) -> pb.ModelInferResponse:
        arrived = time.monotonic()
        first = None
        if partial is not None and self._metrics is not None:
            partial = first = FirstAnswer(partial)
        try:
            response = await self._infer(request, remaining, arrived, request_id, span, admit,
                                         partial)
        except Exception as error:
            code = error.code if isinstance(error, ServingError) else "INTERNAL"
            self._record(request.model_name, request.model_version, code, arrived, request_id,
                         span)
            raise
        except asyncio.CancelledError:  # the caller left: its deadline passed, or it cancelled
            deadline = None if remaining is None else arrived + remaining
            self._record(request.model_name, request.model_version,
                         left_code(deadline, time.monotonic()), arrived, request_id, span)
            raise
        self._record(request.model_name, response.model_version, "OK", arrived, request_id,
                     span)
        if first is not None:
            self._metrics.first_answer(request.model_name, response.model_version,
                                       (first.at or time.monotonic()) - arrived)
        return response

    def _record(self, model: str, version: str, code: str, arrived: float, request_id: str,
                span: Span | None) -> None:
        """Metrics and the access log. Labels stay bounded: a model or version the
        repository lacks is recorded as "". A request that named no version and failed is
        recorded under "" too: the router picks its version per group, and a failed result
        does not say which it picked (a refusal at the ingress comes before any pick)."""
        seconds = time.monotonic() - arrived
        entry = self.repository.models.get(model)
        if entry is None:
            model = version = ""
        elif version not in entry.versions:
            version = ""
        if self._metrics is not None:
            self._metrics.request(model, version, code, seconds)
        trace_id = "" if span is None else format(span.get_span_context().trace_id, "032x")
        access_log(ACCESS_LOG, request_id=request_id, trace_id=trace_id, model=model,
                   version=version, status=code, latency_ms=seconds * 1e3,
                   sample=self.access_log_sample, lines=self._access_log_lines)

    def sample_access_log(self, fraction: float) -> None:
        """Give an access-log line to this fraction (0..1) of the answered requests from
        now on (failures always get one)."""
        self.access_log_sample = fraction

    def answered(self, model: str, version: str, code: str,
                 arrived: float | None = None) -> None:
        """A request answered `code` outside `infer`'s own record (an ensemble's, which
        `arrived` then; one refused before it could be read, an HTTP body that does not
        decode): counted and logged as every request is."""
        self._record(model, version, code, time.monotonic() if arrived is None else arrived,
                     next(self._ids), None)

    def _step(self, name: str, span: Span | None, step: Callable[[], T]) -> T:
        """`step()`, in a child span `name` of the request's when tracing."""
        if span is None:
            return step()
        with self._tracing.tracer.start_as_current_span(name, context=set_span_in_context(span)):
            return step()

    def schema(self, name: str, version: str) -> Schema:
        """The model's compiled configuration (NOT_FOUND for an unknown model or version)."""
        schema = self._schemas.get(name)
        if schema is None:
            schema = self._schemas[name] = Schema(self.repository.get(name).config)
        if version:
            self.repository.version(name, version)
        return schema

    def _bound(self, name: str) -> EdgeBound:
        bound = self._bounds.get(name)
        if bound is None:
            bound = self._bounds[name] = EdgeBound.of(name, self.repository.get(name).config)
        return bound

    def _shed(self, request: pb.ModelInferRequest, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.shed(request.model_name, request.model_version, reason)

    async def _infer(self, request: pb.ModelInferRequest, remaining: float | None,
                     arrived: float, request_id: str, span: Span | None,
                     admit: Callable[[], None] | None,
                     partial: Callable[[ItemResult], None] | None) -> pb.ModelInferResponse:
        if admit is not None:
            self._step("ingress.auth", span, admit)
        schema = self.schema(request.model_name, "")
        if schema.decoupled and partial is None:
            raise called_for_one_answer(request.model_name)
        version = self.served_version(request.model_name, request.model_version)
        if version != request.model_version:  # forwarded as the hops know it
            request.model_version = version
        if self.readiness is not None:
            self.readiness.admit(request.model_name, request.model_version)
        size = self._step("ingress.validate", span, lambda: schema.validate(request)).size
        classes, model = None, None
        if request.outputs:
            model = self.repository.get(request.model_name)
            classes = classification.requested(request, model)
        entry = Entry(request, request_id,
                      deadline_of(parameter(request, "timeout"), arrived, remaining),
                      min(parameter(request, "priority"), MAX_CARRIED),
                      "" if span is None else traceparent_of(span), size, partial)
        forwarder = self._forwarder(request.model_name, request.model_version)
        try:
            self._bound(request.model_name).admit(entry.priority, forwarder.waiting,
                                                  forwarder.round_trip)
        except ResourceExhausted:
            self._shed(request, "saturated")
            raise
        try:
            self.budget.acquire(size)
        except ResourceExhausted:
            self._shed(request, "inflight_bytes")
            raise
        try:
            [result] = await forwarder.forward([entry])
        finally:
            self.budget.release(size)
        raise_for(result)
        if entry.deadline is not None and time.monotonic() > entry.deadline:
            # Computed in a batch whose other requests had longer to live: the deadline
            # bounds the request end to end, so the caller is told it passed.
            raise DeadlineExceeded("deadline exceeded before the answer came back")
        if classes:
            classification.classify(result.response, classes, model)
        return result.response


# OpenTelemetry's gRPC conventions: a server span carries its status code, and is an error
# only for the codes that are the server's fault, not the caller's (INVALID_ARGUMENT, say).
GRPC_STATUS_ATTRIBUTE = "rpc.grpc.status_code"
SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL",
                           "UNAVAILABLE", "DATA_LOSS"})


NO_PARAMETER = pb.InferParameter()


class FirstAnswer:
    """Passes a decoupled model's answers on to `partial`, noting when the first came."""

    def __init__(self, partial: Callable[[ItemResult], None]) -> None:
        self._partial = partial
        self.at: float | None = None

    def __call__(self, result: ItemResult) -> None:
        if self.at is None:
            self.at = time.monotonic()
        self._partial(result)


def stream_error(request: pb.ModelInferRequest, error: Exception) -> pb.ModelStreamInferResponse:
    """A request's failure on a stream, as Triton writes one: its status and message, and the
    request's model and id."""
    message = (error_text(error.code, error.message) if isinstance(error, ServingError)
               else error_text("INTERNAL", internal_error_message(error)))
    return pb.ModelStreamInferResponse(
        error_message=message, infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id))


def more_answer(request: pb.ModelInferRequest,
                result: ItemResult) -> pb.ModelStreamInferResponse:
    """One of a decoupled model's answers before its last, as the stream carries it."""
    if result.code:
        answer = stream_error(request, from_code(CODE_NAME.get(result.code, "UNKNOWN"),
                                                 result.message))
    else:
        answer = pb.ModelStreamInferResponse(infer_response=result.response)
    answer.infer_response.parameters[FINAL_RESPONSE].bool_param = False
    return answer


def pin_request(request: pb.ModelInferRequest, pin: str) -> None:
    if pin and not request.model_version:
        request.model_version = pin


def tensor_metadata(config, tensor) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=tensor.name, datatype=WIRE_FROM_CONFIG[tensor.data_type],
        shape=expected_shape(config, tensor.dims))


def default_priority(request: pb.ModelInferRequest, priority: int) -> None:
    """The caller's default priority, for a request that sets none."""
    if priority and "priority" not in request.parameters:
        request.parameters["priority"].int64_param = priority


# The requests of one ModelStreamInfer stream being served at once (read, and not yet
# answered onto the connection). Beyond it the stream is read no further until one is
# answered, so HTTP/2's flow control holds the client's further requests in the client: a
# client that writes and never reads its answers cannot make the ingress hold more.
STREAM_IN_PROGRESS = 256


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, ingress: Ingress, health: HealthServicer, traced: bool = False,
                 gate: Gate | OpenGate | None = None,
                 stream_in_progress: int = STREAM_IN_PROGRESS,
                 log_control: LogControl | None = None,
                 trace_control: TraceControl | None = None) -> None:
        self._ingress = ingress
        self._health = health
        self._traced = traced
        self._gate = OpenGate() if gate is None else gate
        self._stream_in_progress = stream_in_progress
        self._log_control = log_control
        self._trace_control = trace_control

    def _may(self, context, action: str, model: str) -> Caller:
        caller = self._gate.caller(context)
        self._gate.authorize(caller, action, model)
        return caller

    def _admit(self, caller: Caller, request: pb.ModelInferRequest) -> None:
        self._gate.authorize(caller, "infer", request.model_name)
        self._gate.admit(caller, "infer", request.model_name)
        default_priority(request, self._gate.default_priority(caller))

    async def ServerLive(self, request, context):
        self._gate.caller(context)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        self._gate.caller(context)
        return pb.ServerReadyResponse(ready=self._health.serving())

    async def ServerMetadata(self, request, context):
        self._gate.caller(context)
        return pb.ServerMetadataResponse(name="meshserve", version=__version__,
                                         extensions=EXTENSIONS)

    async def ModelReady(self, request, context):
        """As Triton answers it: a model or version it does not serve is not ready."""
        try:
            return pb.ModelReadyResponse(ready=await self.model_ready(request, context))
        except NotFound:
            return pb.ModelReadyResponse(ready=False)

    async def model_ready(self, request: pb.ModelReadyRequest, context) -> bool:
        """Whether the version can answer now; NOT_FOUND, naming it, for a model or version
        the repository does not serve (HTTP answers 404 with it, as Triton does)."""
        self._may(context, "models:read", request.name)
        version = self._ingress.served_version(request.name, request.version)
        # Not ready, never an error, when the router cannot tell (`_ready`).
        return await self._ready(request.name, version)

    async def _ready(self, name: str, version: str) -> bool:
        """A version is ready when its batcher is; an ensemble when all its steps are."""
        if name in self._ingress.ensembles:
            return await self._ingress.ensembles.ready(name, self._ready)
        if not self._known_ready(name, version):
            return False
        try:
            reply = await self._ingress.router.inference.ModelReady(
                pb.ModelReadyRequest(name=name, version=version), timeout=5)
        except Exception:  # noqa: BLE001 — reported as the model's state
            return False
        return reply.ready

    def _known_ready(self, name: str, version: str) -> bool:
        """False when the ingress knows already that the version cannot answer (the router
        does not answer, or the control plane's table says so), without asking the router:
        a stopped router or batcher would leave the question waiting for its timeout."""
        if not self._ingress.router.serving:
            return False
        if self._ingress.readiness is None:
            return True
        try:
            self._ingress.readiness.admit(name, version)
        except ServingError:
            return False
        return True

    async def ModelMetadata(self, request, context):
        """As Triton's: a version refused at load is UNAVAILABLE, saying why, and is left out
        of `versions`."""
        self._may(context, "models:read", request.name)
        entry = self._ingress.config(request.name, request.version)
        config = entry.config
        return pb.ModelMetadataResponse(
            name=entry.name, platform=config.platform,
            versions=[v for v in entry.versions if not self._ingress.refusal(entry.name, v)],
            inputs=[tensor_metadata(config, t) for t in config.input],
            outputs=[tensor_metadata(config, t) for t in config.output])

    async def ModelConfig(self, request, context):
        """As Triton's: a version refused at load is UNAVAILABLE, saying why; with no version
        asked, the model's configuration."""
        self._may(context, "models:read", request.name)
        return pb.ModelConfigResponse(
            config=self._ingress.config(request.name, request.version).config)

    async def ModelStatistics(self, request, context):
        """Each version's statistics, from its batcher (reached pinned, through the router)."""
        response = pb.ModelStatisticsResponse()
        if request.name:
            self._may(context, "models:read", request.name)
        for name in [request.name] if request.name else self._readable(context):
            wanted = self._ingress.served_version(name, request.version)
            if name in self._ingress.ensembles:
                response.model_stats.extend(self._ingress.ensembles.statistics(name, wanted))
                continue
            for version in [wanted] if wanted else self._ingress.repository.get(name).versions:
                reply = await self._ingress.router.inference.ModelStatistics(
                    pb.ModelStatisticsRequest(name=name, version=version), timeout=5)
                response.model_stats.extend(reply.model_stats)
        return response

    def _readable(self, context) -> list[str]:
        """The models the caller may read, by name."""
        caller = self._gate.caller(context)
        return [name for name in sorted(self._ingress.repository.models)
                if self._gate.allows(caller, "models:read", name)]

    async def RepositoryIndex(self, request, context):
        """Every version and its state; a version its compute refused at load, and a model
        the repository refused, as UNAVAILABLE, saying why."""
        response = pb.RepositoryIndexResponse()
        repository = self._ingress.repository
        for name in self._readable(context):
            for version in repository.models[name].versions:
                ready = await self._ready(name, version)
                if ready or not request.ready:
                    response.models.add(
                        name=name, version=version, state="READY" if ready else "UNAVAILABLE",
                        reason="" if ready else self._ingress.refusal(name, version))
        caller = self._gate.caller(context)
        if not request.ready:
            for name, reason in sorted(repository.refused.items()):
                if self._gate.allows(caller, "models:read", name):
                    response.models.add(name=name, state="UNAVAILABLE", reason=reason)
        return response

    async def LogSettings(self, request, context):
        response = pb.LogSettingsResponse()
        fill_log_settings(response.settings, self.log_settings(
            context, lambda: log_updates(request.settings)))
        return response

    def log_settings(self, context,
                     updates: Callable[[], Mapping[str, object]]) -> LogSettings:
        """Triton's logging extension: this ingress's log settings, once those `updates()`
        gives (none: read them) are applied."""
        caller = self._operator(context, "*", "read or change the log settings")
        if self._log_control is None:
            raise Unimplemented("this ingress serves no log settings")
        asked = updates()
        control = self._log_control
        return control.update(asked, caller.name) if asked else control.settings

    async def TraceSetting(self, request, context):
        response = pb.TraceSettingResponse()
        fill_trace_settings(response.settings, self.trace_settings(
            context, request.model_name, lambda: trace_updates(request.settings)))
        return response

    def trace_settings(self, context, model: str,
                       updates: Callable[[], Mapping[str, list[str] | None]]
                       ) -> TraceSettings:
        """Triton's trace extension: this ingress's trace settings, global or of `model`,
        once those `updates()` gives (none: read them) are applied."""
        of = f" of model '{shown(model)}'" if model else ""
        caller = self._operator(context, model or "*", f"read or change the trace settings{of}")
        if model:
            self._ingress.repository.get(model)  # NOT_FOUND naming an unknown one
        if self._trace_control is None:
            raise Unimplemented("this ingress serves no trace settings")
        asked = updates()
        control = self._trace_control
        return control.update(model, asked, caller.name) if asked else control.settings(model)

    def _operator(self, context, model: str, what: str) -> Caller:
        """The caller, when the policy allows it `admin` on `model` (`*`: the whole mesh)."""
        caller = self._gate.caller(context)
        self._gate.authorize(caller, "admin", model, what=what)
        return caller

    async def ModelInfer(self, request, context):
        metadata = context.invocation_metadata()  # read once: ~6 µs a time
        pin_request(request, header(metadata, PIN_HEADER))
        traceparent = header(metadata, TRACEPARENT) if self._traced else ""
        return await self._ingress.infer(
            request, context.time_remaining(), traceparent,
            admit=lambda: self._admit(self._gate.caller(context, metadata), request))

    def config_of(self, model: str, version: str, context) -> model_config_pb2.ModelConfig:
        """The config of a model that the caller may infer and is about to (HTTP's generate
        routes: the request then passes the gate as every request does). Refused as an
        inference request would be, first, so no caller learns more of the repository here."""
        self._may(context, "infer", model)
        return self._ingress.config(model, version).config

    def refused(self, model: str, version: str, error: ServingError) -> None:
        """A request for `model` refused with `error` before it became a ModelInferRequest
        (an HTTP body that does not decode), counted with the rest."""
        self._ingress.answered(model, version, error.code)

    def _preserves_ordering(self, model: str) -> bool:
        entry = self._ingress.repository.models.get(model)
        return entry is not None and entry.config.dynamic_batching.preserve_ordering

    def _decoupled(self, model: str) -> bool:
        entry = self._ingress.repository.models.get(model)
        return entry is not None and entry.config.model_transaction_policy.decoupled

    async def ModelStreamInfer(self, request_iterator, context):
        """Requests are served concurrently; each request's task writes its answer as soon as
        it is ready (the services' own server takes writes from several tasks, where grpc.aio
        allows one at a time), with no queue and no second task between them. For a model
        whose config sets `dynamic_batching { preserve_ordering: true }`, as in Triton, its
        answers are written in the order its requests came: each after the one before.
        A decoupled model's answers are written as they come, each but the last with
        `triton_final_response` false (`answer_decoupled`).
        At most `stream_in_progress` requests of a stream are in progress at once (the stream
        is read no further meanwhile), and those still in progress when the stream ends
        early (cancelled, past its deadline) are given up."""
        metadata = context.invocation_metadata()
        caller = self._gate.caller(context, metadata)
        remaining = context.time_remaining()
        # The stream's own deadline bounds every request on it, however late it comes.
        deadline = None if remaining is None else time.monotonic() + remaining
        pin = header(metadata, PIN_HEADER)
        traceparent = header(metadata, TRACEPARENT) if self._traced else ""

        ordered: dict[str, asyncio.Future] = {}  # a model's last request's answer, written

        async def serve_one(request, after: asyncio.Future | None = None,
                            written: asyncio.Future | None = None) -> None:
            try:
                await answer_one(request, after)
            finally:
                if written is not None:
                    written.set_result(None)

        async def answer_one(request, after: asyncio.Future | None) -> None:
            if self._decoupled(request.model_name):
                await answer_decoupled(request, after)
                return
            answer = await last_answer(request)
            if after is not None:
                await after
            await context.write(answer)

        async def last_answer(request, partial=None) -> pb.ModelStreamInferResponse:
            try:
                pin_request(request, pin)
                left = None if deadline is None else deadline - time.monotonic()
                response = await self._ingress.infer(
                    request, left, traceparent, admit=lambda: self._admit(caller, request),
                    partial=partial)
                answer = pb.ModelStreamInferResponse(infer_response=response)
            except Exception as error:  # noqa: BLE001 — every request gets an answer
                answer = stream_error(request, error)
            # A request's last answer is said to be final as Triton says it on a stream, for
            # clients that read answers until one is final (decoupled models' clients).
            answer.infer_response.parameters[FINAL_RESPONSE].bool_param = True
            return answer

        async def answer_decoupled(request, after: asyncio.Future | None) -> None:
            """Each answer as it comes (after the answers of the request before, when they
            keep their order), then the last; a last answer without outputs (the model sent
            the final flag alone) only when the request sets
            `triton_enable_empty_final_response`, as in Triton."""
            answers: asyncio.Queue[ItemResult | None] = asyncio.Queue()
            last = asyncio.ensure_future(last_answer(request, answers.put_nowait))
            last.add_done_callback(lambda _: answers.put_nowait(None))
            try:
                if after is not None:
                    await after
                while (result := await answers.get()) is not None:
                    await context.write(more_answer(request, result))
            finally:
                last.cancel()  # the stream ended early: the request is given up
            answer = last.result()
            if (answer.error_message or answer.infer_response.outputs
                    or request.parameters.get(EMPTY_FINAL_RESPONSE, NO_PARAMETER).bool_param):
                await context.write(answer)

        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()
        room = asyncio.Event()  # set when a request in progress is answered

        def answered(task: asyncio.Task) -> None:
            tasks.discard(task)
            room.set()

        try:
            async for request in request_iterator:
                if self._preserves_ordering(request.model_name):
                    written = loop.create_future()
                    after = ordered.get(request.model_name)
                    ordered[request.model_name] = written
                    task = asyncio.create_task(serve_one(request, after, written))
                else:
                    task = asyncio.create_task(serve_one(request))
                tasks.add(task)
                task.add_done_callback(answered)
                while len(tasks) >= self._stream_in_progress:
                    room.clear()
                    await room.wait()
            await asyncio.gather(*tasks)
        finally:
            # The stream ended early (cancelled by its client, its deadline passed): its
            # requests still in progress are given up, as a cancelled unary call's is.
            for task in tasks:
                task.cancel()


JWKS_URL_REFRESH_S = 60.0


def build_gate(settings: IngressSettings, metrics: IngressMetrics | None,
               on_denied: OnDenied | None = None) -> tuple[Gate | OpenGate, list]:
    """The gate (an open one without a policy) and the background tasks it needs."""
    if settings.policy is None:
        return OpenGate(), []
    policy = PolicyFile(settings.policy, time.monotonic)
    source = jwks_source(settings.jwks, time.monotonic) if settings.jwks else None
    gate = Gate(policy.current, dict if source is None else source.keys,
                issuer=settings.token_issuer, audience=settings.token_audience,
                wall_clock=time.time, clock=time.monotonic, random=random.random,
                on_denied=on_denied, denied_sample=settings.audit_denied_sample,
                count_denied=None if metrics is None else metrics.denied)

    async def refresh_jwks() -> None:
        while True:
            await asyncio.sleep(JWKS_URL_REFRESH_S)
            await asyncio.to_thread(source.fetch)

    return gate, [refresh_jwks] if isinstance(source, JwksUrl) else []


def build_service(settings: IngressSettings, metrics: Metrics | None = None,
                  tracing: Tracing | None = None, on_denied: OnDenied | None = None) -> Service:
    """`on_denied(principal, action, model, reason)`, when given, hears of a sampled
    fraction (`audit_denied_sample`) of the calls refused by the policy."""
    repository = ModelRepository.load(settings.repository)
    router = Upstream(settings.router, settings.tls, settings.router_identity)
    ingress_metrics = None if metrics is None else IngressMetrics(metrics)
    readiness = (Readiness(settings.readiness, frozenset(repository.models))
                 if settings.control_plane else None)
    ingress = Ingress(repository, router, ingress_metrics, tracing, settings.access_log_sample,
                      settings.max_inflight_bytes, readiness, settings.group_linger_ms / 1e3,
                      settings.access_log_max_per_second)
    audit = None
    if on_denied is None and settings.control_plane:
        audit = on_denied = AuditEvents(settings.control_plane, settings.tls)
    gate, gate_tasks = build_gate(settings, ingress_metrics, on_denied)
    health = HealthServicer()
    asynchronous = build_async(settings.asynchronous, ingress)
    log_control = LogControl(
        "ingress", LogSettings.at(settings.log_level, settings.log_format),
        settings.access_log_sample, ingress.sample_access_log,
        None if audit is None else partial(audit.record, LOG_SETTINGS_CHANGED))
    trace_control = take_charge(
        tracing, None if audit is None else partial(audit.record, TRACE_SETTINGS_CHANGED))
    inference = InferenceServicer(ingress, health, traced=tracing is not None, gate=gate,
                                  log_control=log_control, trace_control=trace_control)
    # One HTTP port for certificate and token callers alike, so a certificate is optional
    # there whenever a token listener is configured.
    http = build_http(settings.http, settings.tls,
                      settings.require_client_cert and not settings.token_listen, inference,
                      health, asynchronous.requests, gate)

    def ready_or_not() -> None:
        """Ready: the router answers and, with a control plane, the versions can answer."""
        health.set(router.serving and (readiness is None or readiness.ready()))

    follow_readiness = [] if readiness is None else [lambda: follow(
        readiness, settings.control_plane, settings.tls, "control-plane", ready_or_not)]

    def register(server) -> None:
        asynchronous.register(server, gate)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)

    extra_ports = ([(settings.token_listen,
                     server_ssl_context(settings.tls, require_client_cert=False))]
                   if settings.token_listen else [])

    async def announce_token_port() -> None:
        if service.extra_bound:
            log.info("bearer-token callers on port %d", service.extra_bound[0])
            runtime.write_port_file(settings.token_port_file, service.extra_bound[0])

    service = Service(
        settings.listen,
        server_ssl_context(settings.tls, require_client_cert=settings.require_client_cert),
        register, health, background=[*asynchronous.background,
                                      lambda: router.watch(ready_or_not),
                                      *follow_readiness,
                                      announce_token_port, *gate_tasks, *http],
        cleanup=[*asynchronous.cleanup, router.close, *([] if audit is None else [audit.close]),
                 *([] if tracing is None else [tracing.close])],
        extra_ports=extra_ports,
        unserved=None if ingress_metrics is None else unserved_counter(ingress_metrics))
    return service


# The inference call a client makes once per request; a stream's handler runs at once.
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def unserved_counter(metrics: IngressMetrics) -> Unserved:
    """Counts a ModelInfer call that ended before its handler ran (its deadline passed, or
    its client reset it, while it waited) as a failure, as the handler would have."""
    def unserved(method: str, code) -> None:
        if method == MODEL_INFER:
            metrics.unserved(code.name)
    return unserved


def add_auth_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token-listen", default="", metavar="HOST:PORT",
                        help="also serve bearer-token callers here (server TLS only)")
    parser.add_argument("--token-port-file", type=Path,
                        help="write the bound --token-listen port here once serving")
    parser.add_argument("--policy", type=Path,
                        help="access policy (YAML); without it every caller may do anything")
    parser.add_argument("--jwks", default="", metavar="FILE|URL",
                        help="public keys that verify bearer tokens (JWKS)")
    parser.add_argument("--token-issuer", default=DEFAULT_ISSUER,
                        help=f"required 'iss' of tokens (default {DEFAULT_ISSUER})")
    parser.add_argument("--token-audience", default=DEFAULT_AUDIENCE,
                        help=f"required 'aud' of tokens (default {DEFAULT_AUDIENCE})")
    parser.add_argument("--audit-denied-sample", type=sample_fraction, default=0.01,
                        help="fraction (0..1) of denied calls recorded in the audit log")
    parser.add_argument("--control-plane", default="", metavar="HOST:PORT",
                        help="the control plane that reports which versions are ready and "
                             "whose audit log records sampled denied calls "
                             "(empty: denials are only logged and counted)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshserve ingress", description=__doc__)
    runtime.add_server_flags(parser)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--router", required=True, metavar="HOST:PORT", type=target_argument)
    parser.add_argument("--router-identity", default="router",
                        help="identity the router's certificate must name")
    parser.add_argument("--require-client-cert", action="store_true",
                        help="clients must present a certificate signed by --tls-ca")
    add_async_flags(parser)
    parser.add_argument("--readiness", choices=RULES, default=STRICT,
                        help="ServerReady when every model version can answer (strict, the "
                             "default) or when one can (any); followed from --control-plane")
    parser.add_argument("--max-inflight-bytes", type=int, default=256 << 20,
                        help="payload bytes of requests accepted and not yet answered; beyond it "
                             "requests are refused with RESOURCE_EXHAUSTED (0: unbounded)")
    parser.add_argument("--group-linger-ms", type=float,
                        default=DEFAULT_GROUP_LINGER_MS,
                        help="under load, how long a group may wait for the requests the "
                             "ingress expects back before it leaves for the router, so that "
                             "they travel together; at most the last group's round trip "
                             "(0: never)")
    add_auth_flags(parser)
    add_http_flags(parser)
    args = parser.parse_args(argv)
    if args.group_linger_ms < 0:
        parser.error("--group-linger-ms must be 0 or more")
    runtime.configure_logging("ingress", args.log_level, args.log_format)
    settings = IngressSettings(
        asynchronous=async_settings(args),
        listen=args.listen, tls=runtime.tls_files(args), repository=args.model_repository,
        router=args.router, router_identity=args.router_identity,
        require_client_cert=args.require_client_cert, access_log_sample=args.access_log_sample,
        log_level=args.log_level, log_format=args.log_format,
        access_log_max_per_second=args.access_log_max_per_second,
        token_listen=args.token_listen, token_port_file=args.token_port_file,
        policy=args.policy, jwks=args.jwks, token_issuer=args.token_issuer,
        token_audience=args.token_audience, audit_denied_sample=args.audit_denied_sample,
        control_plane=args.control_plane, readiness=args.readiness,
        max_inflight_bytes=args.max_inflight_bytes, group_linger_ms=args.group_linger_ms,
        http=http_settings(args))

    return runtime.run_service("ingress", args, build_service, settings)
