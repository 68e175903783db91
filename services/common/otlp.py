"""Spans out over OTLP/gRPC, with messages of meshserve's own.

The OpenTelemetry SDK makes and batches the spans; this module encodes them
(`meshserve.protocol.otlp_trace_pb2`: OTLP's field numbers under meshserve's own package, see
protos/meshserve/protocol/otlp_trace.proto) and sends them to the collector's
`TraceService/Export`. meshserve imports no `opentelemetry.proto` module at all, so tracing
works whatever copy of those files another package (xds-protos ships an old one) left on
disk, in whatever order pip wrote them.

Configured by the standard variables, traces-specific first (`OTEL_EXPORTER_OTLP_TRACES_*`,
then `OTEL_EXPORTER_OTLP_*`): ENDPOINT (`http://` plaintext, `https://` TLS; without a scheme,
TLS unless INSECURE is true), CERTIFICATE (CA file), CLIENT_KEY and CLIENT_CERTIFICATE (mutual
TLS), HEADERS (`k=v,k=v`, URL-encoded), TIMEOUT (milliseconds, default 10000) and
COMPRESSION (`gzip` or none).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind

from meshserve.protocol import otlp_trace_pb2 as pb

log = logging.getLogger(__name__)

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
# Worth another try within the timeout (the OTLP specification's list).
RETRYABLE = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE,
                       grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
                       grpc.StatusCode.RESOURCE_EXHAUSTED})
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0

_KINDS = {SpanKind.INTERNAL: pb.Span.SPAN_KIND_INTERNAL, SpanKind.SERVER: pb.Span.SPAN_KIND_SERVER,
          SpanKind.CLIENT: pb.Span.SPAN_KIND_CLIENT, SpanKind.PRODUCER: pb.Span.SPAN_KIND_PRODUCER,
          SpanKind.CONSUMER: pb.Span.SPAN_KIND_CONSUMER}
# Span.flags: bit 8 says that bit 9 (the parent, or linked span, is remote) is meaningful.
HAS_IS_REMOTE = 0x100
IS_REMOTE = 0x200


# --- encoding: pure -------------------------------------------------------------------------

def any_value(value) -> pb.AnyValue:
    if isinstance(value, bool):
        return pb.AnyValue(bool_value=value)
    if isinstance(value, str):
        return pb.AnyValue(string_value=value)
    if isinstance(value, int):
        return pb.AnyValue(int_value=value)
    if isinstance(value, float):
        return pb.AnyValue(double_value=value)
    if isinstance(value, bytes):
        return pb.AnyValue(bytes_value=value)
    if isinstance(value, Mapping):
        return pb.AnyValue(kvlist_value=pb.KeyValueList(values=key_values(value)))
    if isinstance(value, Sequence):
        return pb.AnyValue(array_value=pb.ArrayValue(values=[any_value(v) for v in value]))
    return pb.AnyValue() if value is None else pb.AnyValue(string_value=str(value))


def key_values(attributes: Mapping | None) -> list[pb.KeyValue]:
    return [pb.KeyValue(key=str(key), value=any_value(value))
            for key, value in (attributes or {}).items()]


def flags_of(context: SpanContext | None) -> int:
    """The flags the OTLP exporter sets: whether the parent (or linked span) is remote."""
    return HAS_IS_REMOTE | (IS_REMOTE if context is not None and context.is_remote else 0)


def trace_state(context: SpanContext) -> str:
    return ",".join(f"{key}={value}" for key, value in (context.trace_state or {}).items())


def encode_span(span: ReadableSpan) -> pb.Span:
    context = span.get_span_context()
    message = pb.Span(
        trace_id=context.trace_id.to_bytes(16, "big"),
        span_id=context.span_id.to_bytes(8, "big"),
        trace_state=trace_state(context),
        parent_span_id=span.parent.span_id.to_bytes(8, "big") if span.parent else b"",
        flags=flags_of(span.parent),
        name=span.name, kind=_KINDS[span.kind],
        start_time_unix_nano=span.start_time or 0, end_time_unix_nano=span.end_time or 0,
        attributes=key_values(span.attributes),
        dropped_attributes_count=span.dropped_attributes,
        dropped_events_count=span.dropped_events, dropped_links_count=span.dropped_links,
        status=pb.Status(code=span.status.status_code.value,
                         message=span.status.description or ""))
    for event in span.events:
        message.events.add(time_unix_nano=event.timestamp, name=event.name,
                           attributes=key_values(event.attributes),
                           dropped_attributes_count=event.dropped_attributes)
    for link in span.links:
        message.links.add(trace_id=link.context.trace_id.to_bytes(16, "big"),
                          span_id=link.context.span_id.to_bytes(8, "big"),
                          attributes=key_values(link.attributes),
                          dropped_attributes_count=link.dropped_attributes,
                          flags=flags_of(link.context))
    return message


def encode(spans: Sequence[ReadableSpan]) -> pb.ExportTraceServiceRequest:
    """One export request: spans grouped by resource, then by instrumentation scope."""
    request = pb.ExportTraceServiceRequest()
    resources: dict = {}
    for span in spans:
        scopes = resources.setdefault(span.resource, {})
        scopes.setdefault(span.instrumentation_scope, []).append(encode_span(span))
    for resource, scopes in resources.items():
        group = request.resource_spans.add(
            resource=pb.Resource(attributes=key_values(resource.attributes)),
            schema_url=resource.schema_url)
        for scope, encoded in scopes.items():
            group.scope_spans.add(scope=scope_of(scope), spans=encoded,
                                  schema_url=scope.schema_url if scope else "")
    return request


def scope_of(scope: InstrumentationScope | None) -> pb.InstrumentationScope:
    if scope is None:
        return pb.InstrumentationScope()
    return pb.InstrumentationScope(name=scope.name, version=scope.version or "",
                                   attributes=key_values(scope.attributes))


# --- where to: settings from the environment --------------------------------------------------

@dataclass(frozen=True)
class OtlpSettings:
    """The collector and how to reach it; built once from `OTEL_EXPORTER_OTLP_*`."""

    target: str  # HOST:PORT
    insecure: bool = False
    certificate: Path | None = None
    client_key: Path | None = None
    client_certificate: Path | None = None
    headers: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 10.0
    compression: grpc.Compression = grpc.Compression.NoCompression

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> OtlpSettings:
        def read(name: str, default: str = "") -> str:
            return (environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}")
                    or environ.get(f"OTEL_EXPORTER_OTLP_{name}", default)).strip()

        def path(name: str) -> Path | None:
            return Path(read(name)) if read(name) else None

        endpoint = read("ENDPOINT")
        parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
        if not parts.hostname or parts.port is None:
            raise ValueError(f"OTEL_EXPORTER_OTLP_ENDPOINT: {endpoint!r} names no HOST:PORT")
        if parts.scheme not in ("", "http", "https"):
            raise ValueError(f"OTEL_EXPORTER_OTLP_ENDPOINT: scheme {parts.scheme!r} is not "
                             "http or https")
        insecure = (parts.scheme == "http" if parts.scheme
                    else read("INSECURE").lower() == "true")
        compression = read("COMPRESSION", "none").lower()
        if compression not in ("gzip", "none"):
            raise ValueError(f"OTEL_EXPORTER_OTLP_COMPRESSION: {compression!r} is not gzip "
                             "or none")
        return cls(
            target=parts.netloc, insecure=insecure, certificate=path("CERTIFICATE"),
            client_key=path("CLIENT_KEY"), client_certificate=path("CLIENT_CERTIFICATE"),
            headers=parse_headers(read("HEADERS")),
            timeout_s=number("OTEL_EXPORTER_OTLP_TIMEOUT", read("TIMEOUT", "10000"), 0,
                             math.inf) / 1000,
            compression=(grpc.Compression.Gzip if compression == "gzip"
                         else grpc.Compression.NoCompression))


def number(variable: str, text: str, low: float, high: float) -> float:
    """`text` as a number in [low, high]; ValueError naming `variable` otherwise."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        raise ValueError(f"{variable}: {text!r} is not a number from {low:g} to {high:g}")
    return value


def parse_headers(text: str) -> tuple[tuple[str, str], ...]:
    """`k=v,k=v` (URL-encoded) → gRPC metadata, keys lower-cased; a pair without `=` is
    refused."""
    headers = []
    for pair in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = pair.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"OTEL_EXPORTER_OTLP_HEADERS: {pair!r} is not KEY=VALUE")
        headers.append((unquote(key.strip()).lower(), unquote(value.strip())))
    return tuple(headers)


def channel_for(settings: OtlpSettings) -> grpc.Channel:
    options = [("grpc.primary_user_agent", "meshserve-otlp")]
    if settings.insecure:
        return grpc.insecure_channel(settings.target, options=options,
                                     compression=settings.compression)

    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path is not None else None

    credentials = grpc.ssl_channel_credentials(
        read(settings.certificate), read(settings.client_key), read(settings.client_certificate))
    return grpc.secure_channel(settings.target, credentials, options=options,
                               compression=settings.compression)


# --- sending ---------------------------------------------------------------------------------

class OtlpSpanExporter(SpanExporter):
    """Sends each batch the SDK's BatchSpanProcessor hands it (on the processor's thread):
    one Export call, retried with backoff on transient codes until `timeout_s` has passed or
    the exporter is shut down. A batch that cannot be delivered is dropped and logged."""

    def __init__(self, settings: OtlpSettings, channel: grpc.Channel | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._channel = channel if channel is not None else channel_for(settings)
        self._export = self._channel.unary_unary(
            EXPORT_METHOD, request_serializer=pb.ExportTraceServiceRequest.SerializeToString,
            response_deserializer=pb.ExportTraceServiceResponse.FromString)
        self._clock = clock
        self._stopped = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._stopped.is_set():
            return SpanExportResult.FAILURE
        request = encode(spans)
        deadline = self._clock() + self._settings.timeout_s
        backoff = FIRST_BACKOFF_S
        while True:
            left = deadline - self._clock()
            try:
                reply = self._export(request, timeout=max(left, 0.001),
                                     metadata=self._settings.headers or None)
            except grpc.RpcError as error:
                code = error.code()
                if code in RETRYABLE and left > backoff and not self._stopped.wait(backoff):
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                    continue
                log.warning("OTLP export of %d spans to %s failed: %s %s", len(spans),
                            self._settings.target, code.name if code else "", error.details())
                return SpanExportResult.FAILURE
            if reply.partial_success.rejected_spans:
                log.warning("the collector rejected %d of %d spans: %s",
                            reply.partial_success.rejected_spans, len(spans),
                            reply.partial_success.error_message)
            return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._stopped.set()
        self._channel.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
