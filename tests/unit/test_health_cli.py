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
    def __init__(self, answer: health_pb2.HealthCheckResponse) -> None:
        self.answer = answer

    async def Check(self, request, context):  # noqa: N802 — the RPC's name
        return self.answer


SERVING = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    init_certs(directory, days=1)
    return directory


def health(cert_dir, identity: str, answer=SERVING) -> int:
    """`meshserve health` with the developer's certificate against a router on port 0."""
    async def checked() -> int:
        server = grpc.aio.server(options=server_options())
        health_pb2_grpc.add_HealthServicer_to_server(Serving(answer), server)
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


def test_not_serving_says_why_when_the_service_does(cert_dir, capsys):
    refused = health_pb2.HealthCheckResponse(
        status=health_pb2.HealthCheckResponse.NOT_SERVING,
        reason="refusing model 'mlp' version 3: manifest signed by an unknown key")
    assert health(cert_dir, "router", refused) == 1
    assert capsys.readouterr().out == (
        "NOT_SERVING: refusing model 'mlp' version 3: manifest signed by an unknown key\n")
    assert health(cert_dir, "router", health_pb2.HealthCheckResponse(
        status=health_pb2.HealthCheckResponse.NOT_SERVING)) == 1
    assert capsys.readouterr().out == "NOT_SERVING\n"


def test_a_wrong_identity_names_the_expected_one_and_the_one_served(cert_dir, capsys):
    assert health(cert_dir, "compute") == 1
    assert capsys.readouterr().out == (
        "UNAVAILABLE: the server's certificate names 'router', not the expected identity "
        "'compute' (--identity, by default the one in --tls-cert; TLS hostname verification "
        "failed); `--identity router` checks it as that\n")
