"""Each internal server admits only the identities that should call it, health checks aside."""

import grpc
import pytest

from meshserve.common.tls import TlsFiles, secure_channel
from meshserve.protocol import admin_pb2, health_pb2
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.admin_pb2_grpc import AdminStub
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.protocol.health_pb2_grpc import HealthStub
from meshserve.tools.certs import issue_leaf, leaf_names


def address(mesh, name: str) -> str:
    return f"127.0.0.1:{mesh.internal_ports()[name]}"


def one_version(mesh, kind: str) -> tuple[str, str, str]:
    """(port-file name, model, version) of the first `kind` process, e.g. compute-mlp-1."""
    name = sorted(n for n in mesh.internal_ports() if n.startswith(f"{kind}-"))[0]
    model, version = name[len(kind) + 1:].rsplit("-", 1)
    return name, model, version


async def model_ready(mesh, target: str, server: str, caller: str, model: str, version: str):
    async with secure_channel(target, TlsFiles.for_identity(mesh.tls, caller), server) as channel:
        return await GRPCInferenceServiceStub(channel).ModelReady(
            pb.ModelReadyRequest(name=model, version=version), timeout=10)


async def model_infer(mesh, target: str, server: str, caller: str, model: str):
    async with secure_channel(target, TlsFiles.for_identity(mesh.tls, caller), server) as channel:
        return await GRPCInferenceServiceStub(channel).ModelInfer(
            pb.ModelInferRequest(model_name=model), timeout=10)


async def admin_status(mesh, caller: str):
    target = address(mesh, "control-plane")
    files = TlsFiles.for_identity(mesh.tls, caller)
    async with secure_channel(target, files, "control-plane") as channel:
        return await AdminStub(channel).Status(admin_pb2.StatusRequest(), timeout=10)


def denied(raised, caller: str, service: str, allowed: str) -> None:
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert raised.value.details() == \
        f"identity '{caller}' may not call {service}; allowed: {allowed}"


@pytest.mark.parametrize(("caller", "identity"), [
    ("router", "router"), ("ingress", "ingress"), ("client", "client/developer"),
    ("control-plane", "control-plane"), ("compute", "compute")])
async def test_compute_refuses_everyone_but_the_batcher(mesh, caller, identity):
    name, model, _ = one_version(mesh, "compute")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await model_infer(mesh, address(mesh, name), "compute", caller, model)
    denied(raised, identity, "compute", "batcher")


async def test_compute_serves_the_batcher(mesh):
    name, model, version = one_version(mesh, "compute")
    reply = await model_ready(mesh, address(mesh, name), "compute", "batcher", model, version)
    assert reply.ready


@pytest.mark.parametrize("caller", ["ingress", "compute", "batcher"])
async def test_batcher_refuses_other_hops(mesh, caller):
    name, model, version = one_version(mesh, "batcher")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await model_ready(mesh, address(mesh, name), "batcher", caller, model, version)
    denied(raised, caller, "batcher", "client/developer, client/operator, control-plane, router")


@pytest.mark.parametrize("caller", ["router", "control-plane", "client"])
async def test_batcher_serves_router_control_plane_and_operators(mesh, caller):
    name, model, version = one_version(mesh, "batcher")
    reply = await model_ready(mesh, address(mesh, name), "batcher", caller, model, version)
    assert reply.ready


@pytest.mark.parametrize("caller", ["batcher", "compute", "control-plane"])
async def test_router_refuses_other_hops(mesh, caller):
    _, model, version = one_version(mesh, "batcher")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await model_ready(mesh, address(mesh, "router"), "router", caller, model, version)
    denied(raised, caller, "router", "client/developer, client/operator, ingress")


@pytest.mark.parametrize("caller", ["ingress", "client"])
async def test_router_serves_ingress_and_operators(mesh, caller):
    _, model, version = one_version(mesh, "batcher")
    reply = await model_ready(mesh, address(mesh, "router"), "router", caller, model, version)
    assert reply.ready


@pytest.fixture
def alice(mesh, tmp_path) -> TlsFiles:
    """A client certificate of the mesh's CA that is not an operator's: `client/alice`, as
    the access policy names callers it may restrict."""
    cert, key = issue_leaf(mesh.tls / "ca.crt", mesh.tls / "ca.key", tmp_path, "alice",
                           ["URI:spiffe://meshserve.local/client/alice"], 1, client_only=True)
    return TlsFiles(cert, key, mesh.tls / "ca.crt")


@pytest.mark.parametrize("kind", ["router", "batcher"])
async def test_other_client_certificates_cannot_go_around_the_ingress(mesh, alice, kind):
    """Behind the ingress no hop applies the access policy: a client certificate other than
    an operator's, admitted there, would infer on every model past the policy."""
    name, model, version = one_version(mesh, "batcher")
    target = address(mesh, "router" if kind == "router" else name)
    async with secure_channel(target, alice, kind) as channel:
        stub = GRPCInferenceServiceStub(channel)
        for call in (stub.ModelInfer(pb.ModelInferRequest(model_name=model,
                                                          model_version=version), timeout=10),
                     stub.ModelReady(pb.ModelReadyRequest(name=model, version=version),
                                     timeout=10)):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            allowed = ("client/developer, client/operator, ingress" if kind == "router" else
                       "client/developer, client/operator, control-plane, router")
            denied(raised, "client/alice", kind, allowed)


async def test_control_plane_refuses_compute_and_serves_operators(mesh):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await admin_status(mesh, "compute")
    denied(raised, "compute", "control-plane", "batcher, client/*, ingress, router")
    assert (await admin_status(mesh, "client")).models


async def test_health_is_open_to_every_mesh_certificate(mesh):
    for name in mesh.internal_ports():
        server = "control-plane" if name == "control-plane" else name.split("-")[0]
        for caller in leaf_names():
            async with secure_channel(address(mesh, name), TlsFiles.for_identity(mesh.tls, caller),
                                      server) as channel:
                reply = await HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, (name, caller)


@pytest.mark.parametrize(("kind", "caller"), [("compute", "batcher"), ("batcher", "router"),
                                              ("router", "ingress")])
async def test_a_method_a_hop_does_not_serve_is_unimplemented(mesh, kind, caller):
    """The hops serve only part of the inference protocol; a caller they admit that asks
    for the rest hears UNIMPLEMENTED and the method, not an internal error."""
    if kind == "router":
        target, model, version = address(mesh, "router"), "", ""
    else:
        name, model, version = one_version(mesh, kind)
        target = address(mesh, name)
    async with secure_channel(target, TlsFiles.for_identity(mesh.tls, caller), kind) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await GRPCInferenceServiceStub(channel).ModelMetadata(
                pb.ModelMetadataRequest(name=model, version=version), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert raised.value.details() == ("method /inference.GRPCInferenceService/ModelMetadata "
                                      "is not served by this server")
