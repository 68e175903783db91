"""Tracing: configuration from `OTEL_*`, W3C trace context, and the batcher's spans (on, and
none at all when off) with a fake compute replica."""

import asyncio

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, DEFAULT_ON, TraceIdRatioBased
from opentelemetry.trace import get_current_span

from meshserve.batcher.policy import BatchingPolicy, BatchQueue
from meshserve.batcher.scheduler import Replica, Scheduler
from meshserve.batcher.service import Batcher
from meshserve.common.otlp import OtlpSettings
from meshserve.common.statistics import Statistics
from meshserve.common.tracing import (
    Tracing,
    TracingSettings,
    context_of,
    from_environment,
    sampler_of,
    traceparent_of,
)
from meshserve.protocol.groups_pb2 import GroupItem, InferGroup, InferGroupResult, ItemResult
from meshserve.protocol.grpc_service_pb2 import ModelInferResponse
from tests.unit.test_batch import floats, one_input_config, request

CLIENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_no_endpoint_means_tracing_off():
    assert from_environment("batcher", {}) is None
    assert from_environment("batcher", {"OTEL_TRACES_SAMPLER": "always_on",
                                        "OTEL_SERVICE_NAME": "x"}) is None


def test_settings_from_the_standard_variables():
    settings = TracingSettings.from_environment("router", {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25",
        "OTEL_BSP_SCHEDULE_DELAY": "100"})
    assert settings == TracingSettings("router", OtlpSettings("127.0.0.1:4317", insecure=True),
                                       "parentbased_traceidratio", "0.25", 100.0)
    named = TracingSettings.from_environment("router", {"OTEL_SERVICE_NAME": "edge"})
    assert named.service_name == "edge" and named.otlp is None


def test_samplers():
    assert sampler_of("parentbased_always_on", "") is DEFAULT_ON
    assert sampler_of("always_off", "") is ALWAYS_OFF
    assert isinstance(sampler_of("traceidratio", "0.5"), TraceIdRatioBased)
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler_of("sometimes", "")


@pytest.mark.parametrize("arg", ["abc", "1.5", "-0.1", "nan"])
def test_a_sampler_argument_that_is_no_ratio_names_the_variable(arg):
    with pytest.raises(ValueError, match=f"OTEL_TRACES_SAMPLER_ARG: '{arg}' is not a number "
                                         "from 0 to 1"):
        sampler_of("parentbased_traceidratio", arg)


def test_a_schedule_delay_that_is_no_number_names_the_variable():
    with pytest.raises(ValueError, match="OTEL_BSP_SCHEDULE_DELAY: 'soon' is not a number"):
        TracingSettings.from_environment("router", {"OTEL_BSP_SCHEDULE_DELAY": "soon"})


@pytest.mark.parametrize("bad", ["", "00-xyz", "00-" + "0" * 32 + "-b7ad6b7169203331-01",
                                 "00-0af7651916cd43dd8448eb211c80319c-zzzzzzzzzzzzzzzz-01"])
def test_a_missing_or_bad_traceparent_starts_a_new_root(bad):
    assert context_of(bad) is None


TRACE, PARENT = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


@pytest.mark.parametrize("bad", [
    f"ff-{TRACE}-{PARENT}-01",  # version ff is invalid
    f"0g-{TRACE}-{PARENT}-01", f"0-{TRACE}-{PARENT}-01",  # not two hex digits
    f"00-{TRACE.upper()}-{PARENT}-01", f"00-{TRACE}-{PARENT.upper()}-01",  # upper case
    f"00-{TRACE}-{PARENT}-0F",
    f"00-+{TRACE[1:]}-{PARENT}-01", f"00-{TRACE[:4]}_{TRACE[5:]}-{PARENT}-01",  # int() takes
    f"00-{TRACE}- {PARENT[1:]}-01", f"00-{TRACE}-{PARENT}- 1", f"00-{TRACE}-{PARENT}-+1",
    f"00-{TRACE[:31]}\u0663-{PARENT}-01",  # an Arabic-Indic digit, which int() also takes
    f"00-{TRACE[:31]}\u00e9-{PARENT}-01", f"00-{TRACE}--{PARENT[1:]}-01",
    f"00-{TRACE}-{PARENT}-1ff", f"00-{TRACE}-{PARENT}-100", f"00-{TRACE}-{PARENT}-1",
    f"00-{TRACE}-{PARENT}-01-extra", f"00-{TRACE}-{PARENT}-01-",  # 00 has four fields
    f"00-{TRACE}-{'0' * 16}-01",
])
def test_a_traceparent_the_w3c_specification_calls_invalid_starts_a_new_root(bad):
    assert context_of(bad) is None


@pytest.mark.parametrize(("header", "sampled"), [
    (f"00-{TRACE}-{PARENT}-00", False),
    (f" \t00-{TRACE}-{PARENT}-01\t ", True),  # HTTP's optional whitespace around it
    (f"01-{TRACE}-{PARENT}-01-what-comes-later", True),  # a later version: its first fields
    (f"cc-{TRACE}-{PARENT}-09", True),  # flags it does not know: only "sampled" is read
    (f"00-{'1' * 32}-{'2' * 16}-01", True),  # ids without a letter
])
def test_a_valid_traceparent_is_continued(header, sampled):
    context = get_current_span(context_of(header)).get_span_context()
    assert header.strip().split("-")[1:3] == [f"{context.trace_id:032x}",
                                              f"{context.span_id:016x}"]
    assert context.is_remote and context.trace_flags.sampled is sampled


def test_traceparent_round_trip():
    span = get_current_span(context_of(CLIENT))
    assert span.get_span_context().is_remote
    assert traceparent_of(span) == CLIENT


class FakeCompute:
    """A compute replica whose stream answers each batch with the first two columns of
    input A as OUT; `traceparents` holds each batch's trace context."""

    def __init__(self) -> None:
        self.target = "fake:1"
        self.serving = True
        self.stream = self
        self.traceparents: list[str] = []

    async def send(self, body: list[bytes], timeout=None, resend=True, early=None) -> bytes:
        results = []
        for item in InferGroup.FromString(b"".join(body)).items:
            self.traceparents.append(item.traceparent)
            rows = item.request.inputs[0].shape[0]
            response = ModelInferResponse(model_name="m", model_version="1")
            response.outputs.add(name="OUT", datatype="FP32", shape=[rows, 2])
            response.raw_output_contents.append(floats(0, rows * 2))
            results.append(ItemResult(response=response))
        return InferGroupResult(results=results).SerializeToString()


async def run_batch(tracing: Tracing | None, items: list[GroupItem]) -> FakeCompute:
    config = one_input_config()
    compute, statistics = FakeCompute(), Statistics(name="m", version="1")
    scheduler = Scheduler(BatchQueue(BatchingPolicy.from_config(config), "m"),
                          [Replica(compute)], config, "1", statistics, tracing=tracing)
    batcher = Batcher(scheduler, statistics, config, tracing=tracing)
    loop = asyncio.create_task(scheduler.run())
    try:
        results = await batcher.infer(items)
    finally:
        loop.cancel()
        await scheduler.close()
    assert [r.code for r in results] == [0] * len(items)
    return compute


def items() -> list[GroupItem]:
    return [GroupItem(request=request("a", 1), request_id="a", traceparent=CLIENT),
            GroupItem(request=request("b", 2), request_id="b")]


async def test_tracing_off_creates_no_span_and_sends_no_trace_context():
    sent = items()
    compute = await run_batch(None, sent)
    assert compute.traceparents == [""]
    assert [item.traceparent for item in sent] == [CLIENT, ""]


async def test_batch_span_links_every_request_and_is_computes_parent():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    compute = await run_batch(Tracing(provider), items())
    spans = exporter.get_finished_spans()
    queued = [s for s in spans if s.name == "batcher.queue"]
    [batch] = [s for s in spans if s.name == "batcher.batch"]
    assert len(queued) == 2 and len(spans) == 3
    assert queued[0].context.trace_id == int(CLIENT.split("-")[1], 16)
    assert queued[0].parent.span_id == int(CLIENT.split("-")[2], 16)
    assert queued[1].parent is None  # no trace context: a root of its own
    assert [link.context for link in batch.links] == [s.context for s in queued]
    assert batch.parent.span_id == queued[0].parent.span_id  # the oldest request's context
    assert batch.attributes["batch.size"] == 3 and batch.attributes["batch.requests"] == 2
    assert compute.traceparents == [traceparent_of(batch)]

