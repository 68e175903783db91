"""Mutual-TLS credentials for the internal gRPC hops.

Every service has a certificate whose SANs name its identity (see `meshserve.tools.certs`).
A client of an internal service verifies the server by overriding the TLS target name with
the identity it expects, so one certificate works on loopback and in Kubernetes alike:

    files = TlsFiles.for_identity(cert_dir, "ingress")
    channel = secure_channel("router.mesh.svc:7002", files, "router")

Files are read on every call; nothing is cached here, so rotated certificates are picked up
by the next server or channel that is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Client keepalive for long-lived internal channels: ping after 30 s without traffic, give
# the peer 10 s to answer, and keep pinging while idle so a dead peer is noticed before the
# next request rather than by it. Servers must allow this, see server_options().
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class TlsFiles:
    """A certificate, its key, and the CA certificate that peers must chain to."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def for_identity(cls, directory: Path, identity: str) -> TlsFiles:
        """`<directory>/<identity>.crt`, `<identity>.key` and `ca.crt`."""
        directory = Path(directory)
        return cls(
            cert=directory / f"{identity}.crt",
            key=directory / f"{identity}.key",
            ca=directory / "ca.crt",
        )

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(cert chain, private key, CA) as bytes, read now."""
        return Path(self.cert).read_bytes(), Path(self.key).read_bytes(), Path(self.ca).read_bytes()


def server_credentials(
    files: TlsFiles, *, require_client_auth: bool = True
) -> grpc.ServerCredentials:
    """Credentials presenting `files.cert`; clients must present a certificate from `files.ca`.

    With require_client_auth=False the server does not ask for a client certificate (for a
    port that only serves health checks to a kubelet, say).
    """
    cert, key, ca = files.read()
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=ca,
        require_client_auth=require_client_auth,
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Credentials trusting `files.ca` and presenting `files.cert` as the client certificate."""
    cert, key, ca = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def channel_options(identity: str) -> list[tuple[str, object]]:
    """Channel arguments for a hop to the service `identity`.

    The TLS target name (and the :authority) is the identity, so the server certificate
    must carry it as a SAN whatever address the channel dials.
    """
    return [
        ("grpc.ssl_target_name_override", identity),
        ("grpc.default_authority", identity),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def server_options() -> list[tuple[str, object]]:
    """Server arguments matching channel_options: the same message limits, and a ping policy
    that accepts the clients' keepalive (gRPC's default answers pings more often than every
    5 minutes with GOAWAY "too_many_pings")."""
    return [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def secure_channel(target: str, files: TlsFiles, identity: str) -> grpc.aio.Channel:
    """An asyncio channel to `target` that presents `files` and requires the server to prove
    it is `identity`."""
    return grpc.aio.secure_channel(
        target, channel_credentials(files), options=channel_options(identity)
    )
