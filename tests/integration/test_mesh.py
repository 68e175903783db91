"""Bad input, deadlines and internal mutual TLS, against `meshserve up`."""

import asyncio

import grpc
import numpy
import pytest

from meshserve.common import streams, wire
from meshserve.common.forwarding import serialized_group
from meshserve.common.tls import TlsFiles, channel_credentials
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol import health_pb2
from meshserve.protocol.groups_pb2 import GroupItem, InferGroup, InferGroupResult
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.protocol.health_pb2_grpc import HealthStub
from meshserve.tools.certs import init_certs
from meshserve.tools.client import client_tls

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def mlp_request(batch: int = 1, **changes) -> pb.ModelInferRequest:
    x = numpy.ones((batch, 256), numpy.float32)
    request = pb.ModelInferRequest(model_name="mlp", id="req-1")
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=[batch, 256])
    request.raw_input_contents.append(x.tobytes())
    for key, value in changes.items():
        setattr(request, key, value)
    return request


def cnn_request(batch: int, **fields) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="cnn", **fields)
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=[batch, 3, 64, 64])
    request.raw_input_contents.append(numpy.ones((batch, 3, 64, 64), numpy.float32).tobytes())
    return request


def with_input(**fields) -> pb.ModelInferRequest:
    request = mlp_request()
    for key, value in fields.items():
        if key == "shape":
            request.inputs[0].ClearField("shape")
            request.inputs[0].shape.extend(value)
        else:
            setattr(request.inputs[0], key, value)
    return request


def truncated() -> pb.ModelInferRequest:
    request = mlp_request()
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    return request


def without_input() -> pb.ModelInferRequest:
    request = mlp_request()
    del request.inputs[:]
    del request.raw_input_contents[:]
    return request


def asking_for(output: str) -> pb.ModelInferRequest:
    request = mlp_request()
    request.outputs.add(name=output)
    return request


def batch_of(rows: int) -> pb.ModelInferRequest:
    return mlp_request(batch=rows)


MALFORMED = [
    ("unknown model", mlp_request(model_name="nope"), grpc.StatusCode.NOT_FOUND,
     "unknown model 'nope'"),
    ("unknown version", mlp_request(model_version="9"), grpc.StatusCode.NOT_FOUND,
     "model 'mlp' has no version '9' (served: 1, 2)"),
    ("wrong datatype", with_input(datatype="FP64"), grpc.StatusCode.INVALID_ARGUMENT,
     "input 'INPUT__0' has datatype FP64; model 'mlp' expects FP32"),
    ("wrong shape", with_input(shape=[1, 255]), grpc.StatusCode.INVALID_ARGUMENT,
     "input 'INPUT__0' has shape [1, 255]; model 'mlp' expects [-1, 256] with batch size 1 to 32"),
    ("wrong byte length", truncated(), grpc.StatusCode.INVALID_ARGUMENT,
     "input 'INPUT__0' raw_input_contents holds 1020 bytes; shape [1, 256] of FP32 needs 1024"),
    ("missing input", without_input(), grpc.StatusCode.INVALID_ARGUMENT,
     "request has no inputs; model 'mlp' expects INPUT__0"),
    ("batch above max", batch_of(33), grpc.StatusCode.INVALID_ARGUMENT,
     "input 'INPUT__0' has batch size 33; max_batch_size of model 'mlp' is 32"),
    ("unknown output", asking_for("OUTPUT__7"), grpc.StatusCode.INVALID_ARGUMENT,
     "unknown output 'OUTPUT__7' requested (model 'mlp' outputs: OUTPUT__0)"),
]


async def public_stub(mesh):
    channel = grpc.aio.secure_channel(mesh.endpoint, channel_credentials(
        client_tls(mesh.data_dir)))
    return channel, GRPCInferenceServiceStub(channel)


@pytest.mark.parametrize("case, request_, code, message", MALFORMED,
                         ids=[case[0] for case in MALFORMED])
async def test_malformed_request_gets_a_clear_status(mesh, case, request_, code, message):
    channel, stub = await public_stub(mesh)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(request_, timeout=10)
        assert raised.value.code() == code
        assert raised.value.details() == message
        assert (await stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready
        answer = await stub.ModelInfer(mlp_request(), timeout=10)
        assert answer.id == "req-1" and list(answer.outputs[0].shape) == [1, 10]


async def test_short_deadline_gets_deadline_exceeded(mesh):
    channel, stub = await public_stub(mesh)
    request = cnn_request(32, model_version="1")
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(request, timeout=0.005)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (await stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready


async def test_stream_infer_answers_every_request(mesh):
    channel, stub = await public_stub(mesh)
    requests = [mlp_request(id=f"s-{i}") for i in range(20)] + [with_input(datatype="INT8")]
    async with channel:
        answers = [a async for a in stub.ModelStreamInfer(iter(requests), timeout=30)]
    ok = sorted(a.infer_response.id for a in answers if not a.error_message)
    failed = [a for a in answers if a.error_message]
    assert all(a.infer_response.parameters["triton_final_response"].bool_param
               for a in answers)  # each request's one answer is its last, failed or not
    assert ok == sorted(f"s-{i}" for i in range(20))
    assert len(failed) == 1
    assert failed[0].error_message.startswith("INVALID_ARGUMENT: input 'INPUT__0' has datatype")


async def test_stream_answers_each_request_when_it_is_ready(mesh):
    channel, stub = await public_stub(mesh)
    slow = cnn_request(32, id="slow")
    async with channel:
        call = stub.ModelStreamInfer(timeout=30)
        await call.write(slow)
        await call.write(mlp_request(id="quick"))
        await call.done_writing()
        answers = [answer async for answer in call]
    assert [(a.infer_response.id, a.error_message) for a in answers] == [("quick", ""),
                                                                          ("slow", "")]
    assert answers[1].infer_response.outputs[0].shape == [32, 10]


def internal_targets(mesh) -> list[tuple[str, str, str]]:
    """(name, identity, address) of every internal service."""
    return [(name, "control-plane" if name == "control-plane" else name.split("-")[0],
             f"127.0.0.1:{port}") for name, port in sorted(mesh.internal_ports().items())]


async def health_check(target: str, channel: grpc.aio.Channel) -> None:
    async with channel:
        await HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


async def test_internal_ports_accept_the_mesh_ca(mesh):
    targets = internal_targets(mesh)
    # control plane, 12 computes (two for each version of cnn, which asks for two
    # instances), 10 batchers, router
    assert len(targets) == 24
    for _, identity, target in targets:
        files = TlsFiles.for_identity(mesh.tls, "ingress")
        await health_check(target, grpc.aio.secure_channel(
            target, channel_credentials(files),
            options=[("grpc.ssl_target_name_override", identity)]))


@pytest.fixture(scope="module")
def foreign_ca(tmp_path_factory):
    directory = tmp_path_factory.mktemp("foreign")
    init_certs(directory)
    return directory


async def test_internal_ports_refuse_strangers(mesh, foreign_ca):
    ca = (mesh.tls / "ca.crt").read_bytes()
    foreign = TlsFiles.for_identity(foreign_ca, "ingress")
    for name, identity, target in internal_targets(mesh):
        options = [("grpc.ssl_target_name_override", identity)]
        strangers = {
            "plaintext": grpc.aio.insecure_channel(target),
            "no client certificate": grpc.aio.secure_channel(
                target, grpc.ssl_channel_credentials(root_certificates=ca), options=options),
            "certificate from another CA": grpc.aio.secure_channel(
                target, grpc.ssl_channel_credentials(
                    root_certificates=ca, private_key=foreign.key.read_bytes(),
                    certificate_chain=foreign.cert.read_bytes()), options=options),
        }
        for who, channel in strangers.items():
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await health_check(target, channel)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, (name, who)


async def test_a_group_whose_items_do_not_parse_fails_alone_on_the_routers_stream(mesh):
    """The router reads only a group's head and passes the group on; the batcher answers each
    item of a group whose items do not parse INVALID_ARGUMENT, and the groups around it on the
    same streams are answered as ever (before, the stream ended, failing them too)."""
    target = f"127.0.0.1:{mesh.internal_ports()['router']}"
    channel = grpc.aio.secure_channel(
        target, channel_credentials(TlsFiles.for_identity(mesh.tls, "ingress")),
        options=[("grpc.ssl_target_name_override", "router")])
    good = serialized_group(InferGroup(model_name="mlp", version="1"),
                            [([mlp_request().SerializeToString()], GroupItem(request_id="7"))])
    # a second item whose request claims a model name longer than the bytes it holds
    bad = [*good, wire.length_delimited(InferGroup.ITEMS_FIELD_NUMBER, wire.length_delimited(
        GroupItem.REQUEST_FIELD_NUMBER, b"\x0a\x7fshort"))]
    sent = [good, bad, good] * 3  # group ids 1 to 9, written back to back
    async with channel:
        call = streams.start_stream(channel)
        for group_id, group in enumerate(sent, start=1):
            await call.write([streams.frame_head(group_id), *group])
        answers = {}
        while len(answers) < len(sent):
            group_id, body, partial = streams.unframe(await asyncio.wait_for(call.read(), 30))
            if not partial:
                answers[group_id] = InferGroupResult.FromString(body).results
        call.cancel()
    for group_id, group in enumerate(sent, start=1):
        if group is bad:
            assert [r.code for r in answers[group_id]] == [INVALID_ARGUMENT] * 2
            assert all(r.message.startswith("group is not a valid InferGroup message: ")
                       for r in answers[group_id])
        else:
            [answered] = answers[group_id]
            assert answered.code == 0 and answered.response.model_version == "1", answered


async def test_a_priority_past_every_level_is_the_default_level(mesh):
    """Triton's `priority` is a uint64; past a model's levels it means the default level. A
    request with one past 2^32 is answered as any other, and so are the requests grouped
    with it (its group item's field is narrower; such a priority failed the whole group)."""
    channel, stub = await public_stub(mesh)
    async with channel:
        plain = await stub.ModelInfer(mlp_request(model_version="2"), timeout=10)
        for priority in (1 << 32, 1 << 62):
            urgent = mlp_request(id="huge", model_version="2")
            urgent.parameters["priority"].int64_param = priority
            answers = await asyncio.gather(
                stub.ModelInfer(urgent, timeout=10),
                *(stub.ModelInfer(mlp_request(id=f"beside-{i}", model_version="2"), timeout=10)
                  for i in range(8)))
            assert sorted(a.id for a in answers) == sorted(
                ["huge", *(f"beside-{i}" for i in range(8))])
            expected = numpy.frombuffer(plain.raw_output_contents[0], numpy.float32)
            for answer in answers:  # batched with others, so equal up to rounding
                numpy.testing.assert_allclose(
                    numpy.frombuffer(answer.raw_output_contents[0], numpy.float32), expected,
                    rtol=1e-5, atol=1e-6)


async def test_a_version_written_otherwise_is_that_version(mesh):
    """The repository reads "02" and " 2" as version 2, in the request, in the pin header, and
    in ModelReady and ModelStatistics: each is answered for version 2 (inference got
    UNAVAILABLE 'no route in the mesh' with a retry hint, for ever; the others INTERNAL)."""
    channel, stub = await public_stub(mesh)
    async with channel:
        for written in ("02", " 2", "002"):
            answer = await stub.ModelInfer(mlp_request(model_version=written), timeout=10)
            assert answer.model_version == "2", written
            pinned = await stub.ModelInfer(mlp_request(), timeout=10,
                                           metadata=(("x-model-version", written),))
            assert pinned.model_version == "2", written
            ready = await stub.ModelReady(pb.ModelReadyRequest(name="mlp", version=written),
                                          timeout=10)
            assert ready.ready, written  # these two answered INTERNAL
            stats = await stub.ModelStatistics(
                pb.ModelStatisticsRequest(name="mlp", version=written), timeout=10)
            assert [(s.name, s.version) for s in stats.model_stats] == [("mlp", "2")]


async def test_a_status_that_echoes_a_very_long_name_is_cut_not_lost(mesh):
    """A status message travels in a header, and gRPC clients drop an answer whose headers
    pass 8 KiB: echoing a 10,000-character name turned NOT_FOUND into RESOURCE_EXHAUSTED.
    Now the message is cut at 1 KiB. A version of 5,000 digits is NOT_FOUND (it was
    INTERNAL: int() refuses past 4,300 digits)."""
    channel, stub = await public_stub(mesh)
    async with channel:
        for request_, code, start in (
                (mlp_request(model_name="m" * 10_000), grpc.StatusCode.NOT_FOUND,
                 "unknown model 'mmm"),
                (mlp_request(model_version="9" * 5_000), grpc.StatusCode.NOT_FOUND,
                 "model 'mlp' has no version '999")):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ModelInfer(request_, timeout=10)
            details = raised.value.details()
            assert raised.value.code() == code
            assert details.startswith(start) and details.endswith("…")
            assert len(details.encode()) <= 1024
