"""OpenTelemetry traces, configured once from the standard `OTEL_*` variables.

`from_environment(service, os.environ)` is called in a service's `main()`; it returns None
when `OTEL_EXPORTER_OTLP_ENDPOINT` is unset, and the services then check `tracing is None`
on their hot paths and create no span at all. Otherwise spans leave over OTLP/gRPC
(meshserve.common.otlp, which reads the other `OTEL_EXPORTER_OTLP_*` variables) in batches
(`OTEL_BSP_SCHEDULE_DELAY`, milliseconds), sampled by
`OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default: parentbased_always_on).

Between services the W3C `traceparent` travels in `GroupItem.traceparent` (internal hops) or
in gRPC metadata (client → ingress, batcher → compute).
"""

import asyncio
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
from opentelemetry.trace import Span, SpanContext, TraceFlags

from meshserve.common.otlp import OtlpSettings, OtlpSpanExporter

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
            schedule_delay_ms=float(environ.get("OTEL_BSP_SCHEDULE_DELAY", "5000")))


def sampler_of(name: str, arg: str) -> Sampler:
    ratio = float(arg) if arg else 1.0
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


class Tracing:
    """A service's tracer and the provider that exports its spans."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("meshserve")

    @classmethod
    def build(cls, settings: TracingSettings, exporter=None) -> "Tracing":
        if exporter is None:
            exporter = OtlpSpanExporter(settings.otlp)
        provider = TracerProvider(
            sampler=sampler_of(settings.sampler, settings.sampler_arg),
            resource=Resource.create({"service.name": settings.service_name}))
        provider.add_span_processor(BatchSpanProcessor(
            exporter, schedule_delay_millis=settings.schedule_delay_ms))
        return cls(provider)

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


def context_of(traceparent: str) -> Context | None:
    """The remote parent a W3C `traceparent` names; None (a new root) when absent or bad."""
    parts = traceparent.split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    remote = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
    return trace.set_span_in_context(trace.NonRecordingSpan(remote))


def traceparent_of(span: Span) -> str:
    """The W3C `traceparent` that makes `span` the parent of the next hop's spans."""
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def header(metadata, name: str) -> str:
    """A gRPC metadata value ("" when absent)."""
    for key, value in metadata or ():
        if key == name:
            return value
    return ""
