"""OTLP export with meshserve's own messages: byte-for-byte what the OpenTelemetry exporter
sends, settings from the standard variables, and delivery to a real gRPC receiver."""

import logging
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from meshserve.common.otlp import OtlpSettings, OtlpSpanExporter, encode, parse_headers
from tests.otlp_receiver import receiving

# encode_spans(spans()).SerializeToString(deterministic=True) of the OpenTelemetry Python
# exporter (opentelemetry-exporter-otlp-proto-common 1.45.2 over opentelemetry-proto 1.45.2).
OFFICIAL = bytes.fromhex(
    "0ae1030a2a0a190a0c736572766963652e6e616d6512090a07626174636865720a0d0a077265706c69636112"
    "02180212b2030a120a096d65736873657276651205302e312e3012ef010a100af7651916cd43dd8448eb211c"
    "80319c120811111111111111111a0976656e646f723d78312208b7ad6b71692033312a0d626174636865722e"
    "717565756530023900002a36fe9c971741e8032a36fe9c97174a0e0a056d6f64656c12050a036d6c704a0a0a"
    "04726f7773120218044a120a05726174696f120921000000000000e03f4a0c0a06736861646f77120210004a"
    "180a06736861706573120e2a0c0a0218010a0218020a0218034a150a056e616d6573120c2a0a0a030a01610a"
    "030a01625a2009f4012a36fe9c97171208656e7175657565641a0b0a056465707468120218037a0218018501"
    "0003000012a9010a100af7651916cd43dd8448eb211c80319c12082222222222222222220811111111111111"
    "112a0d626174636865722e6261746368300139d0072a36fe9c971741b80b2a36fe9c97174a100a0a62617463"
    "682e73697a65120218016a320a100af7651916cd43dd8448eb211c80319c12081111111111111111220f0a03"
    "77687912080a066d656d62657235000100007a12120e636f6d70757465206661696c65641802850100010000"
)


def spans():
    resource = Resource({"service.name": "batcher", "replica": 2})
    scope = InstrumentationScope("meshserve", "0.1.0")
    trace_id, flags = 0x0AF7651916CD43DD8448EB211C80319C, TraceFlags(1)
    remote = SpanContext(trace_id, 0xB7AD6B7169203331, is_remote=True, trace_flags=flags)
    queue = SpanContext(trace_id, 0x1111111111111111, is_remote=False, trace_flags=flags,
                        trace_state=TraceState([("vendor", "x1")]))
    batch = SpanContext(trace_id, 0x2222222222222222, is_remote=False, trace_flags=flags)
    return [
        ReadableSpan("batcher.queue", queue, parent=remote, resource=resource,
                     attributes={"model": "mlp", "rows": 4, "ratio": 0.5, "shadow": False,
                                 "shapes": (1, 2, 3), "names": ["a", "b"]},
                     events=(Event("enqueued", {"depth": 3}, timestamp=1_700_000_000_000_000_500),),
                     kind=SpanKind.SERVER, status=Status(StatusCode.OK),
                     start_time=1_700_000_000_000_000_000, end_time=1_700_000_000_000_001_000,
                     instrumentation_scope=scope),
        ReadableSpan("batcher.batch", batch, parent=queue, resource=resource,
                     attributes={"batch.size": 1},
                     links=(Link(queue, {"why": "member"}),),
                     kind=SpanKind.INTERNAL, status=Status(StatusCode.ERROR, "compute failed"),
                     start_time=1_700_000_000_000_002_000, end_time=1_700_000_000_000_003_000,
                     instrumentation_scope=scope),
    ]


def test_encoding_is_the_opentelemetry_exporters_byte_for_byte():
    assert encode(spans()).SerializeToString(deterministic=True) == OFFICIAL


def test_spans_are_grouped_by_resource_then_scope():
    [group] = encode(spans()).resource_spans
    assert {a.key: a.value for a in group.resource.attributes}["replica"].int_value == 2
    [scope] = group.scope_spans
    assert (scope.scope.name, scope.scope.version) == ("meshserve", "0.1.0")
    queue, batch = scope.spans
    assert queue.parent_span_id == bytes.fromhex("b7ad6b7169203331")
    assert queue.flags == 0x300 and batch.flags == 0x100  # remote parent; local parent
    assert batch.links[0].span_id == queue.span_id and batch.status.code == 2


@pytest.mark.parametrize(("environ", "expected"), [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"},
     OtlpSettings("collector:4317", insecure=True)),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4317",
      "OTEL_EXPORTER_OTLP_CERTIFICATE": "/etc/ca.crt"},
     OtlpSettings("collector:4317", certificate=Path("/etc/ca.crt"))),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"}, OtlpSettings("collector:4317")),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317", "OTEL_EXPORTER_OTLP_INSECURE": "true"},
     OtlpSettings("collector:4317", insecure=True)),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:1", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT":
      "http://b:2", "OTEL_EXPORTER_OTLP_TIMEOUT": "2500", "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
      "OTEL_EXPORTER_OTLP_HEADERS": "api-key=s%3Dcret, X-Team=ml"},
     OtlpSettings("b:2", insecure=True, timeout_s=2.5, compression=grpc.Compression.Gzip,
                  headers=(("api-key", "s=cret"), ("x-team", "ml")))),
], ids=["http", "https", "no-scheme", "insecure", "traces-first"])
def test_settings_from_the_standard_variables(environ, expected):
    assert OtlpSettings.from_environment(environ) == expected


@pytest.mark.parametrize(("environ", "message"), [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector"}, "names no HOST:PORT"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "grpc://collector:4317"}, "scheme 'grpc'"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:1", "OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"},
     "'zstd' is not gzip"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:1", "OTEL_EXPORTER_OTLP_TIMEOUT": "10s"},
     "OTEL_EXPORTER_OTLP_TIMEOUT: '10s' is not a number from 0 to inf"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:1", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "-1"},
     "OTEL_EXPORTER_OTLP_TIMEOUT: '-1' is not a number"),
])
def test_bad_settings_name_the_variable(environ, message):
    with pytest.raises(ValueError, match=message):
        OtlpSettings.from_environment(environ)


def test_headers_must_be_pairs():
    assert parse_headers("") == ()
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_HEADERS: 'token' is not KEY=VALUE"):
        parse_headers("a=b,token")


def test_export_reaches_a_receiver_with_its_headers():
    with receiving() as (receiver, port):
        exporter = OtlpSpanExporter(OtlpSettings(f"127.0.0.1:{port}", insecure=True,
                                                 headers=(("x-team", "ml"),)))
        try:
            assert exporter.export(spans()) is SpanExportResult.SUCCESS
        finally:
            exporter.shutdown()
    assert receiver.names() == {"batcher.queue", "batcher.batch"}
    assert {service for service, _ in receiver.spans} == {"batcher"}
    assert receiver.metadata[0]["x-team"] == "ml"


def test_a_transient_refusal_is_retried_a_permanent_one_is_not(caplog):
    with receiving() as (receiver, port):
        exporter = OtlpSpanExporter(OtlpSettings(f"127.0.0.1:{port}", insecure=True))
        try:
            receiver.answer = lambda call: grpc.StatusCode.UNAVAILABLE if call == 1 else None
            assert exporter.export(spans()) is SpanExportResult.SUCCESS
            assert receiver.calls == 2 and len(receiver.spans) == 2

            receiver.answer = lambda call: grpc.StatusCode.INVALID_ARGUMENT
            with caplog.at_level(logging.WARNING, logger="meshserve.common.otlp"):
                assert exporter.export(spans()) is SpanExportResult.FAILURE
            assert receiver.calls == 3
            assert "OTLP export of 2 spans" in caplog.text and "INVALID_ARGUMENT" in caplog.text
        finally:
            exporter.shutdown()
        assert exporter.export(spans()) is SpanExportResult.FAILURE  # after shutdown
        assert receiver.calls == 3


def test_no_service_imports_another_copy_of_the_otlp_protos():
    """What makes tracing independent of install order: with tracing on, no module of
    opentelemetry-proto (or of the exporters built on it) is ever imported."""
    script = ("import sys\n"
              "from meshserve.common.tracing import from_environment\n"
              "for name in ('ingress', 'router', 'batcher', 'compute'):\n"
              "    __import__(f'meshserve.{name}.service')\n"
              "import meshserve.mesh.service\n"
              "tracing = from_environment('x', {'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://h:1'})\n"
              "assert tracing is not None\n"
              "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.proto', "
              "'opentelemetry.exporter'))))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "[]"
