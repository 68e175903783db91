"""OpenTelemetry traces, configured once from the standard `OTEL_*` variables.

`from_environment(service, os.environ)` is called in a service's `main()`; it returns None
when `OTEL_EXPORTER_OTLP_ENDPOINT` is unset, and the services then check `tracing is None`
on their hot paths and create no span at all. Otherwise spans leave over OTLP/gRPC
(meshserve.common.otlp, which reads the other `OTEL_EXPORTER_OTLP_*` variables) in batches
(`OTEL_BSP_SCHEDULE_DELAY`, milliseconds), sampled by
`OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default: parentbased_always_on); at the
ingress, by the trace settings that sampler starts them from (meshserve.common.trace_settings).

Between services the W3C `traceparent` travels in `GroupItem.traceparent` (internal hops) or
in gRPC metadata (client → ingress, batcher → compute).
"""

import asyncio
import math
import re
from binascii import unhexlify
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    TraceFlags,
    set_span_in_context,
)

from meshserve.common.otlp import OtlpSettings, OtlpSpanExporter, number

TRACEPARENT = "traceparent"


@dataclass(frozen=True)
class TracingSettings:
    """What the `OTEL_*` variables say; built once in `main()` (tests build it directly)."""

    service_name: str
    otlp: OtlpSettings | None  # the collector; None: tracing off (no endpoint configured)
    sampler: str = "parentbased_always_on"
    sampler_arg: str = ""
    schedule_delay_ms: float = 5000.0

    @classmethod
    def from_environment(cls, service: str, environ: Mapping[str, str]) -> "TracingSettings":
        endpoint = (environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                    or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
        return cls(
            service_name=environ.get("OTEL_SERVICE_NAME") or service,
            otlp=OtlpSettings.from_environment(environ) if endpoint else None,
            sampler=environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").lower(),
            sampler_arg=environ.get("OTEL_TRACES_SAMPLER_ARG", ""),
            schedule_delay_ms=number("OTEL_BSP_SCHEDULE_DELAY",
                                     environ.get("OTEL_BSP_SCHEDULE_DELAY", "5000"), 0, math.inf))


def ratio_of(arg: str) -> float:
    """The ratio `OTEL_TRACES_SAMPLER_ARG` gives (1 when unset)."""
    return number("OTEL_TRACES_SAMPLER_ARG", arg, 0.0, 1.0) if arg else 1.0


def sampler_of(name: str, arg: str) -> Sampler:
    ratio = ratio_of(arg)
    samplers = {
        "always_on": lambda: ALWAYS_ON, "always_off": lambda: ALWAYS_OFF,
        "traceidratio": lambda: TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: DEFAULT_ON,
        "parentbased_always_off": lambda: ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": lambda: ParentBased(TraceIdRatioBased(ratio)),
    }
    if name not in samplers:
        raise ValueError(f"OTEL_TRACES_SAMPLER: unknown sampler '{name}'")
    return samplers[name]()


class Switch(Sampler):
    """A sampler whose decisions another one (`inner`) makes, which a service may replace
    while it runs (the ingress's trace settings)."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner

    def should_sample(self, *args, **kwargs):
        return self.inner.should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return self.inner.get_description()


class Tracing:
    """A service's tracer and the provider that exports its spans; `sampler` decides which
    spans are recorded (from `settings`' `OTEL_TRACES_SAMPLER` at first)."""

    def __init__(self, provider: TracerProvider, settings: TracingSettings | None = None,
                 sampler: Switch | None = None) -> None:
        self.provider = provider
        self.settings = settings or TracingSettings("meshserve", None)
        self.sampler = sampler  # None: the provider's own, not replaced
        self.tracer = provider.get_tracer("meshserve")

    @classmethod
    def build(cls, settings: TracingSettings, exporter=None) -> "Tracing":
        if exporter is None:
            exporter = OtlpSpanExporter(settings.otlp)
        sampler = Switch(sampler_of(settings.sampler, settings.sampler_arg))
        provider = TracerProvider(
            sampler=sampler, resource=Resource.create({"service.name": settings.service_name}))
        provider.add_span_processor(BatchSpanProcessor(
            exporter, schedule_delay_millis=settings.schedule_delay_ms))
        return cls(provider, settings, sampler)

    def start(self, name: str, parent: Context | Span | None = None,
              attributes: Mapping | None = None, links: Iterable[SpanContext] = (),
              kind: trace.SpanKind = trace.SpanKind.INTERNAL) -> Span:
        """A started span (end it yourself); `parent` a context, a span or None (a root)."""
        if isinstance(parent, Span):
            parent = trace.set_span_in_context(parent)
        return self.tracer.start_span(
            name, context=parent, kind=kind, attributes=attributes,
            links=[trace.Link(link) for link in links])

    async def close(self) -> None:
        """Export what is left, without blocking the event loop."""
        await asyncio.to_thread(self.provider.shutdown)


def from_environment(service: str, environ: Mapping[str, str]) -> Tracing | None:
    """The service's tracing, or None (tracing off) when no OTLP endpoint is configured."""
    settings = TracingSettings.from_environment(service, environ)
    return Tracing.build(settings) if settings.otlp is not None else None


# W3C Trace Context `traceparent`: version, trace id, parent id and flags in lower-case hex.
# Version 00 is exactly that; a later version may append fields ("-..."); version ff is
# invalid.
_TRACEPARENT = re.compile(
    r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^ \t]*)?[ \t]*")
_FLAGS = {f"{n:02x}": TraceFlags(n) for n in range(256)}
_from_bytes = int.from_bytes  # big-endian


def context_of(traceparent: str) -> Context | None:
    """The remote parent a W3C `traceparent` names; None (a new root) when absent or invalid
    as the W3C Trace Context specification reads it: upper-case or non-hex digits, a field of
    the wrong length, version ff, version 00 with more fields, an all-zero trace or parent id.
    Spaces and tabs around it are ignored (HTTP's optional whitespace)."""
    if (len(traceparent) == 55 and traceparent[:3] == "00-" and traceparent[35] == "-"
            and traceparent[52] == "-" and traceparent.islower()):
        # Version 00, as every hop sends it. `unhexlify` takes hex digits only (no sign,
        # space or "_", which int() takes), and islower() refused upper-case ones.
        try:
            trace_id = _from_bytes(unhexlify(traceparent[3:35]))
            span_id = _from_bytes(unhexlify(traceparent[36:52]))
        except ValueError:  # binascii.Error is one
            return None
        flags = _FLAGS.get(traceparent[53:])
    elif traceparent:
        trace_id, span_id, flags = _other_form(traceparent)
    else:
        return None
    if flags is None or not trace_id or not span_id:
        return None
    # Positional: SpanContext(trace_id, span_id, is_remote, trace_flags).
    return set_span_in_context(NonRecordingSpan(SpanContext(trace_id, span_id, True, flags)))


def _other_form(traceparent: str) -> tuple[int, int, TraceFlags | None]:
    """(trace id, parent id, flags) of a `traceparent` that is not version 00's 55 lower-case
    characters: with spaces or tabs around it, of a later version, or ids without a letter;
    flags None when it is invalid."""
    match = _TRACEPARENT.fullmatch(traceparent)
    if match is None:
        return 0, 0, None
    version, trace_hex, span_hex, flags_hex, more = match.groups()
    if version == "ff" or (version == "00" and more is not None):
        return 0, 0, None
    return int(trace_hex, 16), int(span_hex, 16), _FLAGS[flags_hex]


def traceparent_of(span: Span) -> str:
    """The W3C `traceparent` that makes `span` the parent of the next hop's spans."""
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def header(metadata, name: str) -> str:
    """A gRPC metadata value ("" when absent)."""
    for key, value in metadata or ():
        if key == name:
            return value
    return ""
