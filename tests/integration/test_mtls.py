"""Mutual TLS between mesh services, over a real gRPC server on loopback."""

import grpc
import pytest

from meshserve.common.certificates import identity_of
from meshserve.common.http2_server import Http2Server, server_ssl_context
from meshserve.common.tls import (
    TlsFiles,
    channel_options,
    secure_channel,
    server_options,
)
from meshserve.protocol import health_pb2, health_pb2_grpc
from meshserve.tools.certs import init_certs

TIMEOUT_S = 5


class Health(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self.peers: list[str | None] = []

    async def Check(self, request, context):
        pem = context.auth_context().get("x509_pem_cert")
        self.peers.append(identity_of(pem[0]) if pem else None)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("other-ca")
    init_certs(directory)
    return directory


async def start(files: TlsFiles, **kwargs):
    server = Http2Server(options=server_options())
    servicer = Health()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", server_ssl_context(files, **kwargs))
    assert port > 0
    await server.start()
    return server, servicer, f"127.0.0.1:{port}"


@pytest.fixture
async def router(cert_dir):
    server, servicer, target = await start(TlsFiles.for_identity(cert_dir, "router"))
    try:
        yield target, servicer
    finally:
        await server.stop(None)


async def check(channel: grpc.aio.Channel) -> health_pb2.HealthCheckResponse:
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return await stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)


async def assert_refused(channel: grpc.aio.Channel, reason: str | None = None) -> None:
    """The call fails UNAVAILABLE; when the client itself rejects the server, `reason` is a
    part of the handshake error (as gRPC 1.85 words it) that names why."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await check(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    if reason is not None:
        assert reason.lower() in (info.value.details() or "").lower(), info.value


def test_for_identity(tmp_path):
    files = TlsFiles.for_identity(tmp_path, "control-plane")
    assert files == TlsFiles(tmp_path / "control-plane.crt", tmp_path / "control-plane.key",
                             tmp_path / "ca.crt")


def test_channel_options_name_the_identity():
    options = dict(channel_options("router"))
    assert options["grpc.ssl_target_name_override"] == "router"
    assert options["grpc.default_authority"] == "router"
    assert options["grpc.max_send_message_length"] == 64 * 1024 * 1024
    assert options["grpc.max_receive_message_length"] == 64 * 1024 * 1024
    assert options["grpc.keepalive_time_ms"] > 0


async def test_service_to_service(router, cert_dir):
    target, servicer = router
    reply = await check(secure_channel(target, TlsFiles.for_identity(cert_dir, "ingress"),
                                       "router"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert servicer.peers == ["ingress"]  # the server sees the client's identity


async def test_developer_client(router, cert_dir):
    target, servicer = router
    files = TlsFiles.for_identity(cert_dir, "client")
    reply = await check(secure_channel(target, files, "router"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert servicer.peers == ["client/developer"]


async def test_plaintext_is_refused(router):
    target, servicer = router
    await assert_refused(grpc.aio.insecure_channel(target))
    assert servicer.peers == []


async def test_tls_without_client_certificate_is_refused(router, cert_dir):
    target, servicer = router
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(cert_dir / "ca.crt").read_bytes()
    )
    await assert_refused(
        grpc.aio.secure_channel(target, credentials, options=channel_options("router"))
    )
    assert servicer.peers == []


async def test_client_from_another_ca_is_refused(router, cert_dir, other_dir):
    target, servicer = router
    # A well-formed ingress certificate, but issued by a CA the server does not trust.
    files = TlsFiles(cert=other_dir / "ingress.crt", key=other_dir / "ingress.key",
                     ca=cert_dir / "ca.crt")
    await assert_refused(secure_channel(target, files, "router"))
    assert servicer.peers == []


async def test_server_from_another_ca_is_refused(router, other_dir):
    target, servicer = router
    await assert_refused(
        secure_channel(target, TlsFiles.for_identity(other_dir, "ingress"), "router"),
        reason="CERTIFICATE_VERIFY_FAILED",
    )
    assert servicer.peers == []


async def test_server_identity_is_verified(router, cert_dir):
    target, servicer = router
    # The server presents the router certificate; a client dialling the batcher refuses it.
    await assert_refused(
        secure_channel(target, TlsFiles.for_identity(cert_dir, "ingress"), "batcher"),
        reason="Hostname Verification",
    )
    assert servicer.peers == []


async def test_client_auth_can_be_optional(cert_dir):
    server, servicer, target = await start(TlsFiles.for_identity(cert_dir, "router"),
                                           require_client_cert=False)
    try:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(cert_dir / "ca.crt").read_bytes()
        )
        reply = await check(
            grpc.aio.secure_channel(target, credentials, options=channel_options("router"))
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert servicer.peers == [None]
    finally:
        await server.stop(None)
