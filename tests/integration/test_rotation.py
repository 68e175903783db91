"""`meshserve certs rotate` under load: no request fails, and every service serves the new
certificates without a restart (its own `meshserve up`, since it rewrites the files)."""

import asyncio
import hashlib
import shutil
import socket
import ssl
import sys
import time
from pathlib import Path

import grpc
import numpy
import pytest

from meshserve.common.http2_server import server_ssl_context
from meshserve.common.server import HealthServicer, Service
from meshserve.common.tls import (
    ReloadingChannel,
    TlsFiles,
    channel_credentials,
    channel_options,
)
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol import health_pb2
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.protocol.health_pb2_grpc import HealthStub
from meshserve.tools.certs import ca_bundle, init_certs, rotate_certs
from tests.integration.conftest import children_of, running_mesh
from tests.polling import until

CLIENTS = 8
MAX_REQUESTS_PER_CLIENT = 20_000
# Seconds after the load starts: re-issue the leaves, move to a new CA, drop the old CA.
ROTATIONS = ((1.5, ()), (3.5, ("--new-ca",)), (7.0, ("--drop-old-ca",)))
AFTER_SECONDS = 2.0  # load after the last rotation


def mlp_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, 256])
    request.raw_input_contents.append(numpy.ones((1, 256), numpy.float32).tobytes())
    return request


async def client(endpoint: str, credentials, stop: asyncio.Event, done: list, failed: list):
    async with grpc.aio.secure_channel(endpoint, credentials) as channel:
        stub = GRPCInferenceServiceStub(channel)
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if stop.is_set():
                return
            try:
                reply = await stub.ModelInfer(mlp_request(), timeout=10)
                assert list(reply.outputs[0].shape) == [1, 10]
                done.append(time.monotonic())
            except grpc.aio.AioRpcError as error:
                failed.append((error.code(), error.details()))


async def rotate(tls_dir: Path, *flags: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshserve.tools.cli", "certs", "rotate", str(tls_dir), *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, output.decode()


def served_certificate(port: int, tls: TlsFiles, name: str) -> bytes:
    """The DER certificate a fresh TLS connection to `port` is shown."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(tls.ca))
    context.load_cert_chain(str(tls.cert), str(tls.key))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=name) as connection:
        return connection.getpeercert(binary_form=True)


def file_certificate(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def identity_of_port_file(name: str) -> str:
    return name if name in ("control-plane", "router", "ingress") else name.split("-")[0]


@pytest.fixture
def rotating_mesh(tmp_path):
    data_dir = tmp_path / "data"
    with running_mesh(data_dir, extra_args=("--no-metrics",)) as mesh:
        yield mesh
    assert children_of(data_dir) == []


async def test_rotation_under_load_drops_no_request(rotating_mesh):
    mesh = rotating_mesh
    tls_dir = mesh.tls
    operator = TlsFiles.for_identity(tls_dir, "client")
    old_client = channel_credentials(operator)  # read now: the old CA and the old leaf
    old_fingerprint = hashlib.sha256(file_certificate(tls_dir / "ingress.crt")).hexdigest()

    stop = asyncio.Event()
    done: list[float] = []
    failed: list = []
    started = time.monotonic()
    clients = [asyncio.create_task(client(mesh.endpoint, old_client, stop, done, failed))
               for _ in range(CLIENTS)]
    rotated_at = []
    try:
        for at, flags in ROTATIONS:
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            await rotate(tls_dir, *flags)
            rotated_at.append(time.monotonic())
        await asyncio.sleep(AFTER_SECONDS)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), timeout=30)

    assert failed == []
    assert len(ca_bundle(tls_dir)) == 1
    # Requests kept flowing between and after the rotations.
    for begin, end in zip(rotated_at, [*rotated_at[1:], rotated_at[-1] + AFTER_SECONDS],
                          strict=True):
        assert any(begin <= t <= end for t in done), (begin, end, len(done))

    # Every service, the ingress included, shows the new certificate to a new connection.
    ports = {p.stem: int(p.read_text()) for p in (mesh.data_dir / "run").glob("*.port")}
    assert len(ports) >= 5
    for name, port in sorted(ports.items()):
        identity = identity_of_port_file(name)
        served = served_certificate(port, operator, identity)
        assert served == file_certificate(tls_dir / f"{identity}.crt"), name
    assert hashlib.sha256(file_certificate(tls_dir / "ingress.crt")).hexdigest() != \
        old_fingerprint

    # The old CA is no longer trusted: a new connection with the old client certificate
    # fails, the new one works.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async with grpc.aio.secure_channel(mesh.endpoint, old_client) as channel:
            await GRPCInferenceServiceStub(channel).ModelInfer(mlp_request(), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.secure_channel(mesh.endpoint, channel_credentials(operator)) as channel:
        reply = await GRPCInferenceServiceStub(channel).ModelInfer(mlp_request(), timeout=10)
    assert list(reply.outputs[0].shape) == [1, 10]


async def serving(channel: grpc.aio.Channel) -> bool:
    try:
        reply = await HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_open_connections_survive_a_new_ca_and_new_ones_need_the_reloaded_files(tmp_path):
    init_certs(tmp_path)
    health = HealthServicer()
    health.set(True)
    service = Service("127.0.0.1:0", server_ssl_context(TlsFiles.for_identity(tmp_path, "router")),
                      lambda server: None, health)
    target = f"127.0.0.1:{await service.start()}"
    ingress = TlsFiles.for_identity(tmp_path, "ingress")
    old_credentials = channel_credentials(ingress)  # the files as they are now
    reloading = ReloadingChannel(target, ingress, "router")
    opened = grpc.aio.secure_channel(target, old_credentials, options=channel_options("router"))
    try:
        assert await serving(opened) and await serving(reloading.channel)
        rotate_certs(tmp_path, new_ca=True)
        rotate_certs(tmp_path, drop_old_ca=True)

        # Open connections stay up: certificates are checked at the handshake only.
        assert await serving(opened) and await serving(reloading.channel)
        # A new connection with the old files fails both ways (the server has a leaf of the
        # new CA and no longer trusts the old one) ...
        fresh = [*channel_options("router"), ("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.secure_channel(target, old_credentials, options=fresh) as stale:
            assert not await serving(stale)
        # ... and one with the reloaded files works.
        assert reloading.refresh() is True
        assert reloading.refresh() is False
        assert await serving(reloading.channel)
    finally:
        await opened.close()
        await reloading.close()
        await service.stop(0)


async def test_ready_first_keeps_the_old_channel_while_the_new_one_cannot_connect(tmp_path):
    server_dir, client_dir, stranger_dir = (tmp_path / n for n in ("server", "client", "other"))
    for directory in (server_dir, client_dir, stranger_dir):
        init_certs(directory)
    client = TlsFiles.for_identity(client_dir, "ingress")
    for name in (client.cert.name, client.key.name, client.ca.name):  # one mesh, one CA
        shutil.copy(server_dir / name, client_dir / name)
    health = HealthServicer()
    health.set(True)
    service = Service("127.0.0.1:0",
                      server_ssl_context(TlsFiles.for_identity(server_dir, "router")),
                      lambda server: None, health)
    target = f"127.0.0.1:{await service.start()}"
    reloading = ReloadingChannel(target, client, "router", ready_first=True, ready_wait=0.5)
    try:
        old_channel = reloading.channel
        assert await serving(old_channel)
        # Files of another CA: the server refuses the new channel's handshake.
        for name in (client.cert.name, client.key.name, client.ca.name):
            shutil.copy(stranger_dir / name, client_dir / name)
        assert reloading.refresh() is False
        first_try = reloading._pending.channel
        deadline = time.monotonic() + 2.0  # four times ready_wait
        while time.monotonic() < deadline:
            assert reloading.refresh() is False
            await asyncio.sleep(0.05)
        assert reloading.channel is old_channel
        assert reloading._pending.channel is not first_try  # stuck: built again
        assert await serving(reloading.channel)

        # Files the server accepts again: swapped in once connected.
        for name in (client.cert.name, client.key.name, client.ca.name):
            shutil.copy(server_dir / name, client_dir / name)
        await until(reloading.refresh, 10, "the channel with the good files swapped in")
        assert reloading.channel is not old_channel
        assert await serving(reloading.channel)
    finally:
        await reloading.close()
        await service.stop(0)
