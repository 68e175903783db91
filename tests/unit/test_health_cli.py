"""`meshserve health` against a real gRPC server on port 0 over mutual TLS: a wrong identity
is named, with the one the server's certificate carries."""

import asyncio

import grpc
import pytest

from meshserve.common.tls import TlsFiles, server_credentials, server_options
from meshserve.protocol import health_pb2, health_pb2_grpc
from meshserve.tools.certs import init_certs
from meshserve.tools.cli import main


class Serving(health_pb2_grpc.HealthServicer):
    async def Check(self, request, context):  # noqa: N802 — the RPC's name
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    init_certs(directory, days=1)
    return directory


def health(cert_dir, identity: str) -> int:
    """`meshserve health` with the developer's certificate against a router on port 0."""
    async def checked() -> int:
        server = grpc.aio.server(options=server_options())
        health_pb2_grpc.add_HealthServicer_to_server(Serving(), server)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(
            TlsFiles.for_identity(cert_dir, "router")))
        await server.start()
        try:
            return await asyncio.to_thread(main, [
                "health", f"127.0.0.1:{port}", "--identity", identity,
                "--tls-cert", str(cert_dir / "client.crt"),
                "--tls-key", str(cert_dir / "client.key"), "--tls-ca", str(cert_dir / "ca.crt")])
        finally:
            await server.stop(None)

    return asyncio.run(checked())


def test_the_right_identity_is_serving(cert_dir, capsys):
    assert health(cert_dir, "router") == 0
    assert capsys.readouterr().out == "SERVING\n"


def test_a_wrong_identity_names_the_expected_one_and_the_one_served(cert_dir, capsys):
    assert health(cert_dir, "compute") == 1
    assert capsys.readouterr().out == (
        "UNAVAILABLE: the server's certificate names 'router', not the expected identity "
        "'compute' (--identity, by default the one in --tls-cert; TLS hostname verification "
        "failed); `--identity router` checks it as that\n")
