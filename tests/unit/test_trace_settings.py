"""Triton's trace settings for OpenTelemetry traces: what the ingress starts with, each
refusal, a model's own settings over the global ones, which requests start a trace (rate and
count), and the sampler that applies them."""

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    TraceFlags,
    set_span_in_context,
)

from meshserve.common.errors import FailedPrecondition, InvalidArgument
from meshserve.common.trace_settings import (
    OFF,
    TIMESTAMPS,
    Sampled,
    TraceControl,
    TraceSettings,
    fill_trace_settings,
    json_document,
    sent_values,
    take_charge,
    trace_updates,
)
from meshserve.common.tracing import Tracing, TracingSettings
from meshserve.protocol import grpc_service_pb2 as pb

ON = TraceSettings(TIMESTAMPS, 1, -1)


@pytest.mark.parametrize(("sampler", "ratio", "expected"), [
    ("parentbased_always_on", 1.0, ON),
    ("always_on", 1.0, ON),
    ("always_off", 1.0, TraceSettings(OFF, 1000, -1)),
    ("parentbased_traceidratio", 0.01, TraceSettings(TIMESTAMPS, 100, -1)),
    ("traceidratio", 0.3, TraceSettings(TIMESTAMPS, 3, -1)),
    ("parentbased_traceidratio", 0.0, TraceSettings(OFF, 1000, -1)),
])
def test_the_ingress_starts_with_what_its_sampler_said(sampler, ratio, expected):
    assert TraceSettings.of_sampler(sampler, ratio) == expected


def test_the_settings_as_triton_writes_them():
    assert json_document(ON) == {"trace_level": ["TIMESTAMPS"], "trace_rate": "1",
                                 "trace_count": "-1", "log_frequency": "0", "trace_file": "",
                                 "trace_mode": "opentelemetry"}


@pytest.mark.parametrize(("updates", "message"), [
    ({"trace_nope": ["1"]}, "unknown trace setting 'trace_nope' (settings: trace_level, "
                            "trace_rate, trace_count, log_frequency, trace_file, trace_mode)"),
    ({"trace_level": ["TENSORS"]}, "trace setting 'trace_level' TENSORS is not served: a "
                                   "trace never holds a request's data"),
    ({"trace_level": ["OFF", "TIMESTAMPS"]}, "trace setting 'trace_level' must be [\"OFF\"] "
                                             "or [\"TIMESTAMPS\"], not ['OFF', 'TIMESTAMPS']"),
    ({"trace_level": ["on"]}, "trace setting 'trace_level' must be [\"OFF\"] or "
                              "[\"TIMESTAMPS\"], not ['on']"),
    ({"trace_rate": ["0"]}, "trace setting 'trace_rate' must be a whole number from 1, not '0'"),
    ({"trace_rate": ["1e3"]}, "trace setting 'trace_rate' must be a whole number from 1, not "
                              "'1e3'"),
    ({"trace_rate": ["1", "2"]}, "trace setting 'trace_rate' takes one string, not ['1', '2']"),
    ({"trace_count": ["-2"]}, "trace setting 'trace_count' must be a whole number from -1, "
                              "not '-2'"),
    ({"trace_file": ["/tmp/trace.json"]}, "trace setting 'trace_file' can only be '': spans "
                                          "leave over OTLP, no trace file is written"),
    ({"trace_mode": ["triton"]}, "trace setting 'trace_mode' can only be 'opentelemetry': "
                                 "meshserve's traces are OpenTelemetry's"),
    ({"log_frequency": ["50"]}, "trace setting 'log_frequency' can only be '0': spans leave "
                                "over OTLP as they end"),
])
def test_a_refused_update_names_the_setting_and_changes_nothing(updates, message):
    control = TraceControl(ON)
    with pytest.raises(InvalidArgument) as refused:
        control.update("", {"trace_rate": ["5"], **updates}, "client/ops")
    assert refused.value.message == message
    assert control.settings() == ON


def test_a_model_follows_the_global_settings_it_does_not_set_and_null_clears_its_own():
    audited = []
    control = TraceControl(ON, audit=lambda by, changes: audited.append(changes))
    assert control.update("mlp", {"trace_rate": ["10"]}, "client/ops") == \
        TraceSettings(TIMESTAMPS, 10, -1)
    control.update("", {"trace_level": ["OFF"], "trace_count": ["5"]}, "client/ops")
    assert control.settings("mlp") == TraceSettings(OFF, 10, 5)
    assert control.settings("cnn") == control.settings() == TraceSettings(OFF, 1, 5)
    assert control.update("mlp", {"trace_rate": None}, "client/ops") == control.settings()
    assert control.update("", {"trace_level": None, "trace_count": None}, "client/ops") == ON
    assert "mlp" not in control.owners  # nothing of its own left
    assert audited == ["model 'mlp': trace_rate=10", "global: trace_level=OFF, trace_count=5",
                       "model 'mlp': trace_rate=1", "global: trace_level=TIMESTAMPS, "
                                                    "trace_count=-1"]


def test_every_rate_th_request_starts_a_trace_until_the_count_is_spent():
    control = TraceControl(TraceSettings(TIMESTAMPS, 3, -1))
    assert [control.sample("mlp") for _ in range(6)] == [False, False, True] * 2
    control.update("", {"trace_rate": ["1"], "trace_count": ["2"]}, "client/ops")
    assert [control.sample("cnn") for _ in range(4)] == [True, True, False, False]
    assert control.settings().count == 0  # what is left, as a read shows it


def test_a_model_with_its_own_rate_and_count_is_counted_apart():
    control = TraceControl(TraceSettings(TIMESTAMPS, 2, -1))
    control.update("mlp", {"trace_rate": ["1"], "trace_count": ["1"]}, "client/ops")
    sampled = [(control.sample("mlp"), control.sample("cnn")) for _ in range(4)]
    assert sampled == [(True, False), (False, True), (False, False), (False, True)]
    assert control.settings("mlp").count == 0 and control.settings().count == -1
    control.update("cnn", {"trace_level": ["OFF"]}, "client/ops")
    assert not any(control.sample("cnn") for _ in range(4))


def test_without_tracing_the_settings_stay_off():
    control = take_charge(None)
    assert control.settings() == TraceSettings(OFF, 1000, -1)
    control.update("mlp", {"trace_rate": ["5"]}, "client/ops")  # harmless, allowed
    with pytest.raises(FailedPrecondition, match="tracing is off in this ingress: it exports "
                                                 "no traces"):
        control.update("mlp", {"trace_level": ["TIMESTAMPS"]}, "client/ops")
    assert not control.sample("mlp")


def remote(sampled: bool):
    context = SpanContext(0x1234, 0x5678, is_remote=True,
                          trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else 0))
    return set_span_in_context(NonRecordingSpan(context))


@pytest.mark.parametrize("parent_based", [True, False])
def test_the_sampler_decides_for_requests_and_spans_inside_follow_them(parent_based):
    control = TraceControl(TraceSettings(TIMESTAMPS, 2, -1))
    sampler = Sampled(control, parent_based)

    def decide(parent=None, model="mlp") -> bool:
        result = sampler.should_sample(parent, 1, "ingress.request", attributes={
            "model": model})
        return result.decision == Decision.RECORD_AND_SAMPLE

    assert [decide(), decide()] == [False, True]
    local = set_span_in_context(NonRecordingSpan(SpanContext(1, 2, is_remote=False,
                                                             trace_flags=TraceFlags(1))))
    assert all(decide(local) for _ in range(3))  # inside a traced request: not counted
    assert decide() is False  # the third request
    # A caller's traceparent decides where the sampler is parent-based; else the settings
    # (every request, now).
    control.update("", {"trace_rate": ["1"]}, "client/ops")
    assert decide(remote(False)) is not parent_based
    control.update("", {"trace_level": ["OFF"]}, "client/ops")
    assert decide(remote(True)) is parent_based


def test_the_ingress_puts_its_settings_in_charge_of_its_tracer():
    exported = InMemorySpanExporter()
    tracing = Tracing.build(TracingSettings("ingress", None, "parentbased_traceidratio", "0.5"),
                            exporter=exported)
    try:
        control = take_charge(tracing)
        assert control.settings() == TraceSettings(TIMESTAMPS, 2, -1)
        spans = [tracing.start("ingress.request", attributes={"model": "mlp"})
                 for _ in range(4)]
        assert [span.get_span_context().trace_flags.sampled for span in spans] == \
            [False, True, False, True]
        for span in spans:
            span.end()
        tracing.provider.force_flush()
        assert len(exported.get_finished_spans()) == 2
    finally:
        tracing.provider.shutdown()


def test_grpc_and_json_forms():
    request = pb.TraceSettingRequest()
    request.settings["trace_rate"].value.append("10")
    request.settings["trace_count"]  # noqa: B018 — sent without values: null
    assert trace_updates(request.settings) == {"trace_rate": ["10"], "trace_count": None}
    answer = pb.TraceSettingResponse()
    fill_trace_settings(answer.settings, ON)
    assert {name: list(value.value) for name, value in answer.settings.items()} == {
        name: [value] if isinstance(value, str) else value
        for name, value in json_document(ON).items()}
    assert sent_values("trace_rate", "10") == ["10"]
    assert sent_values("trace_level", ["OFF"]) == ["OFF"]
    assert sent_values("trace_rate", None) is None
    with pytest.raises(InvalidArgument, match="trace setting 'trace_rate' takes a string, a "
                                              "list of strings or null, not 10"):
        sent_values("trace_rate", 10)
