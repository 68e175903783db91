"""Traces of `meshserve up --otlp`: one request's spans from all four services reach a local
OTLP receiver under the client's trace id, with the right parents and links."""

import asyncio
import contextlib
import http.client
import json
import secrets
import ssl
import time

import grpc
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from meshserve.protocol import grpc_service_pb2 as pb
from tests.integration.conftest import running_mesh
from tests.integration.test_mesh import mlp_request, public_stub
from tests.otlp_receiver import receiving

SERVICES = {"ingress", "router", "batcher", "compute"}
NAMES = {"ingress.request", "ingress.auth", "ingress.validate", "router.route", "batcher.queue",
         "batcher.batch", "compute.infer"}


@pytest.fixture(scope="module")
def receiver():
    with receiving() as started:
        yield started


@pytest.fixture(scope="module")
def traced_mesh(tmp_path_factory, receiver):
    _, port = receiver
    data_dir = tmp_path_factory.mktemp("traced") / "data"
    with running_mesh(data_dir, extra_args=(f"--otlp=127.0.0.1:{port}",
                                            "--access-log-sample=1"),
                      extra_env={"OTEL_BSP_SCHEDULE_DELAY": "100"}) as mesh:
        yield mesh


def by_name(spans) -> dict[str, tuple[str, object]]:
    return {span.name: (service, span) for service, span in spans}


async def test_one_request_is_traced_across_all_four_services(traced_mesh, receiver):
    collected, _ = receiver
    trace_id, client_span = secrets.token_bytes(16), secrets.token_bytes(8)
    traceparent = f"00-{trace_id.hex()}-{client_span.hex()}-01"
    channel, stub = await public_stub(traced_mesh)
    async with channel:
        answer = await stub.ModelInfer(mlp_request(model_version="1"), timeout=30,
                                       metadata=(("traceparent", traceparent),))
    assert answer.model_version == "1"

    deadline = time.monotonic() + 20
    while not set(by_name(collected.of_trace(trace_id))) >= NAMES:
        assert time.monotonic() < deadline, \
            f"spans seen: {sorted(by_name(collected.of_trace(trace_id)))}"
        await asyncio.sleep(0.1)
    spans = collected.of_trace(trace_id)
    assert {service for service, _ in spans} == SERVICES
    named = by_name(spans)
    assert {name: service for name, (service, _) in named.items()} == {
        "ingress.request": "ingress", "ingress.auth": "ingress", "ingress.validate": "ingress",
        "router.route": "router", "batcher.queue": "batcher", "batcher.batch": "batcher",
        "compute.infer": "compute"}
    span = {name: s for name, (_, s) in named.items()}
    parent_of = {s.span_id: s.parent_span_id for _, s in spans}

    def ancestors(span_id: bytes) -> list[bytes]:
        chain = []
        while span_id in parent_of:
            span_id = parent_of[span_id]
            chain.append(span_id)
        return chain

    request = span["ingress.request"]
    assert request.parent_span_id == client_span
    assert span["ingress.auth"].parent_span_id == request.span_id
    assert span["ingress.validate"].parent_span_id == request.span_id
    assert span["ingress.auth"].end_time_unix_nano <= span["ingress.validate"].start_time_unix_nano
    assert request.span_id in ancestors(span["router.route"].span_id)
    assert span["batcher.queue"].parent_span_id == span["router.route"].span_id
    assert request.span_id in ancestors(span["batcher.batch"].span_id)
    assert span["compute.infer"].parent_span_id == span["batcher.batch"].span_id
    links = {(link.trace_id, link.span_id) for link in span["batcher.batch"].links}
    assert (trace_id, span["batcher.queue"].span_id) in links
    batch_size = {a.key: a.value.int_value for a in span["batcher.batch"].attributes}
    assert batch_size["batch.size"] == 1
    compute = {a.key: a.value for a in span["compute.infer"].attributes}
    assert compute["device"].string_value == "cpu"
    assert compute["batch.size"].int_value == 1
    route = {a.key: a.value for a in span["router.route"].attributes}
    assert route["model"].string_value == "mlp" and route["pin"].string_value == "1"
    assert route["shadow"].bool_value is False


async def test_access_log_carries_the_trace_id_and_logs_hold_no_payload(traced_mesh):
    trace_id = secrets.token_bytes(16)
    traceparent = f"00-{trace_id.hex()}-{secrets.token_bytes(8).hex()}-01"
    marker = b"PAYLOAD-MARKER-" + secrets.token_hex(4).encode()  # 23 bytes of "input"
    request = mlp_request(model_version="2")
    request.raw_input_contents[0] = marker + bytes(1024 - len(marker))
    channel, stub = await public_stub(traced_mesh)
    async with channel:
        answer = await stub.ModelInfer(request, timeout=30,
                                       metadata=(("traceparent", traceparent),))
    assert answer.model_version == "2"
    log = traced_mesh.data_dir / "run" / "ingress.log"
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in log.read_text().splitlines()
                 if line.startswith("{")]
        access = [line for line in lines if line.get("trace_id") == trace_id.hex()]
        if access or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert len(access) == 1
    assert access[0]["logger"] == "meshserve.access"
    assert (access[0]["model"], access[0]["version"], access[0]["status"]) == ("mlp", "2", "OK")
    assert access[0]["request_id"] and access[0]["latency_ms"] > 0
    for path in (traced_mesh.data_dir / "run").glob("*.log"):
        assert marker not in path.read_bytes(), path.name


async def test_an_ensemble_request_gets_its_access_log_line(traced_mesh):
    """The ensemble `classify`, asked with an input it does not have: one access-log line,
    as for any failed request (it was counted in the metrics, with no line)."""
    request = mlp_request()
    request.model_name = "classify"
    channel, stub = await public_stub(traced_mesh)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ModelInfer(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    log = traced_mesh.data_dir / "run" / "ingress.log"

    def classify_lines() -> list[dict]:
        lines = [json.loads(line) for line in log.read_text().splitlines()
                 if line.startswith("{")]
        return [line for line in lines if line.get("logger") == "meshserve.access"
                and line.get("model") == "classify"]

    deadline = time.monotonic() + 10
    while not classify_lines():
        assert time.monotonic() < deadline, "no access-log line for the ensemble"
        await asyncio.sleep(0.1)
    [line] = classify_lines()
    assert (line["version"], line["status"]) == ("1", "INVALID_ARGUMENT")
    assert line["request_id"] and line["latency_ms"] >= 0


async def test_an_http_request_continues_the_clients_trace(traced_mesh, receiver):
    collected, _ = receiver
    trace_id, client_span = secrets.token_bytes(16), secrets.token_bytes(8)
    port = int((traced_mesh.data_dir / "run" / "ingress.http-port").read_text())
    tls = traced_mesh.data_dir / "tls"
    context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    context.load_cert_chain(tls / "client.crt", tls / "client.key")
    body = json.dumps({"inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [1, 256],
                                   "data": [0.0] * 256}]})

    def post() -> int:
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        try:
            connection.request("POST", "/v2/models/mlp/versions/1/infer", body, {
                "traceparent": f"00-{trace_id.hex()}-{client_span.hex()}-01"})
            return connection.getresponse().status
        finally:
            connection.close()

    assert await asyncio.to_thread(post) == 200
    deadline = time.monotonic() + 20
    while not set(by_name(collected.of_trace(trace_id))) >= NAMES:
        assert time.monotonic() < deadline, \
            f"spans seen: {sorted(by_name(collected.of_trace(trace_id)))}"
        await asyncio.sleep(0.1)
    request = by_name(collected.of_trace(trace_id))["ingress.request"][1]
    assert request.parent_span_id == client_span


async def test_a_traceparent_the_w3c_specification_calls_invalid_is_not_continued(traced_mesh,
                                                                                  receiver):
    """Version ff is invalid: the request starts a trace of its own, in every service."""
    collected, _ = receiver
    invalid, valid = secrets.token_bytes(16), secrets.token_bytes(16)
    channel, stub = await public_stub(traced_mesh)
    async with channel:
        for version, trace_id in (("ff", invalid), ("00", valid)):
            traceparent = f"{version}-{trace_id.hex()}-{secrets.token_bytes(8).hex()}-01"
            await stub.ModelInfer(mlp_request(model_version="1"), timeout=30,
                                  metadata=(("traceparent", traceparent),))
    # Each service exports its spans in the order they ended: once the second request's
    # spans are in from all four, the first's would be too.
    deadline = time.monotonic() + 20
    while not set(by_name(collected.of_trace(valid))) >= NAMES:
        assert time.monotonic() < deadline, \
            f"spans seen: {sorted(by_name(collected.of_trace(valid)))}"
        await asyncio.sleep(0.1)
    assert collected.of_trace(invalid) == []


async def test_a_group_answered_in_parts_is_traced_and_answered(traced_mesh, receiver):
    """Eight requests of 16 rows at once (max_batch_size 32): the batcher answers their
    group in parts, each batch as it finishes. Traced, every request is answered, and each
    one's `router.route` span ends with the version that answered it."""
    collected, _ = receiver
    trace_ids = [secrets.token_bytes(16) for _ in range(8)]
    channel, stub = await public_stub(traced_mesh)
    async with channel:
        answers = await asyncio.gather(*(
            stub.ModelInfer(mlp_request(batch=16, model_version="1", id=f"parts-{i}"),
                            timeout=30, metadata=(("traceparent",
                                                   f"00-{trace_id.hex()}-{'ab' * 8}-01"),))
            for i, trace_id in enumerate(trace_ids)))
    assert [list(a.outputs[0].shape) for a in answers] == [[16, 10]] * 8

    def routed() -> list:
        return [span for trace_id in trace_ids
                for span in by_name(collected.of_trace(trace_id)).values()
                if span[1].name == "router.route"]

    deadline = time.monotonic() + 20
    while len(routed()) < len(trace_ids):
        assert time.monotonic() < deadline, f"router.route spans: {len(routed())}"
        await asyncio.sleep(0.1)
    for _, span in routed():
        version = {a.key: a.value.string_value for a in span.attributes}["version"]
        assert (version, span.status.code) == ("1", 0)


async def test_the_request_span_carries_its_grpc_status_and_is_an_error_only_for_the_servers(
        traced_mesh, receiver):
    """OpenTelemetry's gRPC conventions: `rpc.grpc.status_code` on the ingress's server span,
    whose status is ERROR for a code that is the server's fault, not for a caller's bad
    input (INVALID_ARGUMENT, 3) or an unknown model (NOT_FOUND, 5)."""
    collected, _ = receiver
    bad = mlp_request(model_version="1")
    bad.inputs[0].shape[:] = [1, 3]
    unknown = mlp_request(model_version="1")
    unknown.model_name = "no-such-model"
    traces = {}
    channel, stub = await public_stub(traced_mesh)
    async with channel:
        for name, request in (("ok", mlp_request(model_version="1")), ("bad", bad),
                              ("unknown", unknown)):
            traces[name] = secrets.token_bytes(16)
            traceparent = f"00-{traces[name].hex()}-{secrets.token_bytes(8).hex()}-01"
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.ModelInfer(request, timeout=30, metadata=(("traceparent",
                                                                       traceparent),))

    def request_span(trace_id):
        return by_name(collected.of_trace(trace_id)).get("ingress.request", (None, None))[1]

    deadline = time.monotonic() + 20
    while any(request_span(t) is None for t in traces.values()):
        assert time.monotonic() < deadline, "the ingress's spans did not arrive"
        await asyncio.sleep(0.1)
    spans = {name: request_span(trace_id) for name, trace_id in traces.items()}
    codes = {name: [a.value.int_value for a in span.attributes
                    if a.key == "rpc.grpc.status_code"] for name, span in spans.items()}
    assert codes == {"ok": [0], "bad": [3], "unknown": [5]}
    unset = Status.StatusCode.STATUS_CODE_UNSET
    assert {name: span.status.code for name, span in spans.items()} == {
        "ok": unset, "bad": unset, "unknown": unset}


async def trace_setting(stub, model: str = "", **updates) -> dict[str, list[str]]:
    """The ingress's trace settings (global, or `model`'s) after `updates` (a name to its
    values, or None: cleared)."""
    request = pb.TraceSettingRequest(model_name=model)
    for name, values in updates.items():
        request.settings[name].value.extend(values or [])
    answer = await stub.TraceSetting(request, timeout=10)
    return {name: list(value.value) for name, value in answer.settings.items()}


def mlp_traces(collected) -> set[bytes]:
    """The traces of the mlp's requests the receiver has, by their ingress.request spans."""
    with collected._lock:
        spans = [span for _, span in collected.spans if span.name == "ingress.request"]
    return {span.trace_id for span in spans
            if {a.key: a.value.string_value for a in span.attributes}.get("model") == "mlp"}


async def traced_to_here(stub, collected) -> bytes:
    """A request its caller traces (a sampled traceparent, continued whatever the settings),
    once its ingress.request span has arrived: the ingress exports its spans in the order
    they ended, so every earlier request's has arrived too. Returns its trace id."""
    trace_id = secrets.token_bytes(16)
    traceparent = f"00-{trace_id.hex()}-{secrets.token_bytes(8).hex()}-01"
    await stub.ModelInfer(mlp_request(model_version="1"), timeout=30,
                          metadata=(("traceparent", traceparent),))
    deadline = time.monotonic() + 20
    while trace_id not in mlp_traces(collected):
        assert time.monotonic() < deadline, "the ingress's spans did not arrive"
        await asyncio.sleep(0.1)
    return trace_id


async def test_trace_settings_decide_which_requests_start_a_trace(traced_mesh, receiver):
    """As `up --otlp` starts (OTEL_TRACES_SAMPLER unset: every request starts one). With
    the mlp's own rate of 3, six requests without a traceparent start two traces; with its
    level OFF, none, while a caller's sampled traceparent is still continued. Set back
    after (null: the global settings again)."""
    collected, _ = receiver
    channel, stub = await public_stub(traced_mesh)
    async with channel:
        assert await trace_setting(stub) == {
            "trace_level": ["TIMESTAMPS"], "trace_rate": ["1"], "trace_count": ["-1"],
            "log_frequency": ["0"], "trace_file": [""], "trace_mode": ["opentelemetry"]}
        try:
            assert (await trace_setting(stub, "mlp", trace_rate=["3"]))["trace_rate"] == ["3"]
            before = mlp_traces(collected)
            for _ in range(6):
                await stub.ModelInfer(mlp_request(model_version="1"), timeout=30)
            marker = await traced_to_here(stub, collected)
            assert len(mlp_traces(collected) - before - {marker}) == 2

            await trace_setting(stub, "mlp", trace_level=["OFF"])
            before = mlp_traces(collected)
            for _ in range(3):
                await stub.ModelInfer(mlp_request(model_version="1"), timeout=30)
            marker = await traced_to_here(stub, collected)
            assert mlp_traces(collected) - before == {marker}
        finally:
            cleared = await trace_setting(stub, "mlp", trace_rate=None, trace_level=None)
        assert cleared == await trace_setting(stub)
