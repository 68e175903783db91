"""`peer_identity_of`: a call's mesh identity from the names gRPC keeps of the peer's
certificate is the one `identity_of` reads from the certificate itself, on a real mutual-TLS
gRPC server, for certificates with and without a SPIFFE URI of the trust domain."""

import grpc
import pytest

from meshserve.common.certificates import identity_of, peer_identity_of
from meshserve.common.http2_server import Http2Server, server_ssl_context
from meshserve.common.tls import TlsFiles
from meshserve.tools import certs
from meshserve.tools.certs import init_certs

METHOD = "/test.Peer/Identity"
MESH = "spiffe://meshserve.local"
# A name per certificate and its SANs, in the certificate's order.
CERTIFICATES = {
    "dns-first": ["DNS:app", "IP:127.0.0.1", f"URI:{MESH}/app/one"],
    "two-identities": [f"URI:{MESH}/first", f"URI:{MESH}/second", "DNS:two"],
    "foreign-domain": ["DNS:plain", "URI:spiffe://elsewhere.example/router"],
    "dns-only": ["DNS:plain", "DNS:other"],
    "bare-prefix": [f"URI:{MESH}/", "DNS:bare"],
}


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    directory = tmp_path_factory.mktemp("peer") / "certs"
    init_certs(directory)
    for name, sans in CERTIFICATES.items():
        certs.issue_leaf(directory / "ca.crt", directory / "ca.key", directory, name, sans,
                         days=1, client_only=True)
    return directory


async def answer(request: bytes, context) -> bytes:
    """The identity from gRPC's names of the peer, and from the peer's certificate."""
    pem = (context.auth_context() or {}).get("x509_pem_cert")
    return f"{peer_identity_of(context)}|{identity_of(pem[0]) if pem else None}".encode()


async def call(tls, client: str | None, require_client_auth: bool = True) -> list[str]:
    server = Http2Server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Peer", {"Identity": grpc.unary_unary_rpc_method_handler(answer)}),))
    files = TlsFiles.for_identity(tls, "ingress")
    port = server.add_secure_port(
        "127.0.0.1:0", server_ssl_context(files, require_client_cert=require_client_auth))
    await server.start()
    try:
        ca = (tls / "ca.crt").read_bytes()
        credentials = (grpc.ssl_channel_credentials(ca) if client is None else
                       grpc.ssl_channel_credentials(ca, (tls / f"{client}.key").read_bytes(),
                                                    (tls / f"{client}.crt").read_bytes()))
        async with grpc.aio.secure_channel(
                f"127.0.0.1:{port}", credentials,
                options=[("grpc.ssl_target_name_override", "ingress")]) as channel:
            reply = await channel.unary_unary(METHOD)(b"", timeout=10)
        return reply.decode().split("|")
    finally:
        await server.stop(None)


@pytest.mark.parametrize("client, expected", [
    ("client", "client/developer"),
    ("dns-first", "app/one"),
    ("two-identities", "first"),
    ("foreign-domain", "None"),
    ("dns-only", "None"),
    ("bare-prefix", "None"),
])
async def test_the_peer_names_give_the_certificates_identity(tls, client, expected):
    fast, slow = await call(tls, client)
    assert fast == slow == expected


async def test_a_call_without_a_certificate_has_no_peer_identity(tls):
    assert await call(tls, None, require_client_auth=False) == ["None", "None"]
