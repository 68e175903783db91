"""`meshserve up --model-repository PATH` with one version of a model that serves and two its
computes refuse at load (an output of another datatype than config.pbtxt declares, found at
warm-up; a file that is no TorchScript archive): the repository index says why each refused
version is UNAVAILABLE, over gRPC and HTTP, as Triton's does, and ModelReady, ModelMetadata
and inference agree with it."""

import http.client
import json
import ssl

import grpc
import numpy
import pytest
import torch

from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.tools.client import outputs_of
from tests.integration.conftest import running_mesh
from tests.integration.test_http import http_port
from tests.integration.test_mesh import public_stub
from tests.polling import until

CONFIG = """
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
version_policy: { all { } }
"""
# The control plane hears of a refusal from the batcher, which hears of it from its compute,
# after `up` has reported it: the ingress's table holds it soon after, never at once.
REASON_ARRIVES_S = 30.0
REASON_LIMIT = 512  # characters of a refusal the mesh carries


class PlusOne(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return x + 1


class PlusOneInDoubles(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return (x + 1).double()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("refused")
    models = root / "repository"
    for version in ("1", "2", "3"):
        (models / "twin" / version).mkdir(parents=True)
    (models / "twin" / "config.pbtxt").write_text(CONFIG)
    torch.jit.save(torch.jit.script(PlusOne()), str(models / "twin" / "1" / "model.pt"))
    torch.jit.save(torch.jit.script(PlusOneInDoubles()),
                   str(models / "twin" / "2" / "model.pt"))
    (models / "twin" / "3" / "model.pt").write_bytes(b"not a TorchScript archive")
    with running_mesh(root / "data", extra_args=(f"--model-repository={models}",)) as mesh:
        mesh.models = models
        yield mesh


def expected_reasons(mesh) -> dict[str, tuple[str, ...]]:
    """What the reason of each refused version must say: the file, and what is wrong."""
    return {
        "2": (f"refusing model 'twin' version 2: {mesh.models / 'twin' / '2' / 'model.pt'}: "
              "warm-up failed: model 'twin' version 2: configuration expects datatype "
              "TYPE_FP32 for output 'OUTPUT__0', model provides TYPE_FP64",),
        "3": (f"refusing model 'twin' version 3: {mesh.models / 'twin' / '3' / 'model.pt'}: "
              "RuntimeError: ", "PytorchStreamReader failed reading zip archive")}


async def grpc_index(mesh) -> dict[str, tuple[str, str]]:
    channel, stub = await public_stub(mesh)
    async with channel:
        reply = await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    return {m.version: (m.state, m.reason) for m in reply.models if m.name == "twin"}


def https(mesh, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """One HTTP/REST call with the client certificate: its status and body."""
    context = ssl.create_default_context(cafile=str(mesh.tls / "ca.crt"))
    context.load_cert_chain(mesh.tls / "client.crt", mesh.tls / "client.key")
    connection = http.client.HTTPSConnection("127.0.0.1", http_port(mesh), context=context,
                                             timeout=30)
    try:
        connection.request(method, path, body)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def http_index(mesh) -> dict[str, tuple[str, str]]:
    status, body = https(mesh, "POST", "/v2/repository/index", b"{}")
    assert status == 200
    return {m["version"]: (m["state"], m.get("reason", "")) for m in json.loads(body)
            if m["name"] == "twin"}


def says_why(index: dict[str, tuple[str, str]], mesh) -> bool:
    return all(index[version][1] for version in expected_reasons(mesh))


def assert_index(index: dict[str, tuple[str, str]], mesh) -> None:
    assert index["1"] == ("READY", "")
    for version, parts in expected_reasons(mesh).items():
        state, reason = index[version]
        assert state == "UNAVAILABLE", version
        assert reason.startswith(parts[0]), (version, reason)
        assert all(part in reason for part in parts), (version, reason)
        assert len(reason) <= REASON_LIMIT


async def test_the_grpc_index_says_why_a_version_was_refused(served):
    async def arrived() -> bool:
        return says_why(await grpc_index(served), served)

    await until(arrived, REASON_ARRIVES_S, "the refusals' reasons in the gRPC index",
                interval=0.2)
    assert_index(await grpc_index(served), served)


async def test_the_http_index_says_why_a_version_was_refused(served):
    await until(lambda: says_why(http_index(served), served), REASON_ARRIVES_S,
                "the refusals' reasons in the HTTP index", interval=0.2)
    assert_index(http_index(served), served)
    reasons = expected_reasons(served)
    for version, ready in (("1", 200), ("2", 400), ("3", 400)):
        assert https(served, "GET", f"/v2/models/twin/versions/{version}/ready")[0] == ready
    status, body = https(served, "GET", "/v2/models/twin")
    assert (status, json.loads(body)["versions"]) == (200, ["1"])
    status, body = https(served, "GET", "/v2/models/twin/versions/2")
    assert status == 503
    assert json.loads(body)["error"].startswith(
        f"model 'twin' version '2' is not ready: {reasons['2'][0]}")


async def test_ready_metadata_and_inference_agree_with_the_index(served):
    await until(lambda: says_why(http_index(served), served), REASON_ARRIVES_S,
                "the refusals' reasons in the index", interval=0.2)
    reasons = expected_reasons(served)
    channel, stub = await public_stub(served)
    async with channel:
        ready = {version: (await stub.ModelReady(
            pb.ModelReadyRequest(name="twin", version=version), timeout=10)).ready
            for version in ("1", "2", "3")}
        assert ready == {"1": True, "2": False, "3": False}
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name="twin"), timeout=10)
        assert list(meta.versions) == ["1"]  # as Triton's: the versions that are ready
        assert (await stub.ModelMetadata(pb.ModelMetadataRequest(name="twin", version="1"),
                                         timeout=10)).inputs[0].name == "INPUT__0"
        for version in ("2", "3"):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ModelMetadata(pb.ModelMetadataRequest(name="twin", version=version),
                                         timeout=10)
            assert_not_ready(raised.value, version, reasons)
        x = numpy.array([[1.0, 2.0]], numpy.float32)
        request = pb.ModelInferRequest(model_name="twin", model_version="2")
        request.inputs.add(name="INPUT__0", datatype="FP32", shape=x.shape)
        request.raw_input_contents.append(x.tobytes())
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(request, timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert reasons["2"][0] in raised.value.details()
        request.model_version = ""
        answer = await stub.ModelInfer(request, timeout=30)
        assert answer.model_version == "1"
        assert outputs_of(answer)["OUTPUT__0"].tolist() == [[2.0, 3.0]]


def assert_not_ready(error: grpc.aio.AioRpcError, version: str, reasons: dict) -> None:
    """UNAVAILABLE naming the version of `twin` and the reason its compute refused it."""
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details().startswith(
        f"model 'twin' version '{version}' is not ready: {reasons[version][0]}")
    assert all(part in error.details() for part in reasons[version])


async def test_the_config_of_a_refused_version_is_unavailable_as_its_metadata(served):
    """As Triton's: the configuration of a version that is not available is an error, over
    gRPC and HTTP alike (503, as its metadata); with no version asked, the model's."""
    await until(lambda: says_why(http_index(served), served), REASON_ARRIVES_S,
                "the refusals' reasons in the index", interval=0.2)
    reasons = expected_reasons(served)
    channel, stub = await public_stub(served)
    async with channel:
        for version in ("", "1"):
            reply = await stub.ModelConfig(pb.ModelConfigRequest(name="twin", version=version),
                                           timeout=10)
            assert (reply.config.name, reply.config.max_batch_size) == ("twin", 4)
        for version in ("2", "3"):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ModelConfig(pb.ModelConfigRequest(name="twin", version=version),
                                       timeout=10)
            assert_not_ready(raised.value, version, reasons)
    for path in ("/v2/models/twin/config", "/v2/models/twin/versions/1/config"):
        status, body = https(served, "GET", path)
        assert (status, json.loads(body)["max_batch_size"]) == (200, 4)
    status, body = https(served, "GET", "/v2/models/twin/versions/2/config")
    assert status == 503
    assert json.loads(body)["error"].startswith(
        f"model 'twin' version '2' is not ready: {reasons['2'][0]}")
