"""Mutual-TLS credentials for the internal gRPC hops.

Every service has a certificate whose SANs name its identity (see `meshserve.tools.certs`).
A client of an internal service verifies the server by overriding the TLS target name with
the identity it expects, so one certificate works on loopback and in Kubernetes alike:

    files = TlsFiles.for_identity(cert_dir, "ingress")
    channel = secure_channel("router.mesh.svc:7002", files, "router")

Certificates are reloaded when their files change (`meshserve certs rotate`): a server
re-reads them at the next TLS handshake, a `ReloadingChannel` when `refresh()` is called
(its owner polls). A key that does not match its certificate (a rotation half written) is
not loaded; the old pair stays in use until the files agree.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

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

    def signature(self) -> tuple:
        """What changes when any of the three files is replaced or rewritten."""
        stats = [os.stat(path) for path in (self.cert, self.key, self.ca)]
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)

    def read_consistent(self) -> tuple[bytes, bytes, bytes]:
        """Like read(), but raises MismatchedKey when the key is not the certificate's."""
        cert, key, ca = self.read()
        check_pair(cert, key)
        return cert, key, ca


class MismatchedKey(ValueError):
    """A private key that does not belong to the certificate next to it."""


def check_pair(cert_pem: bytes, key_pem: bytes) -> None:
    """Raise MismatchedKey unless `key_pem` is the private key of `cert_pem`'s first cert."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise MismatchedKey("the private key does not match the certificate")


class ServerCertificates:
    """gRPC's certificate fetcher for `dynamic_ssl_server_credentials`: called at every TLS
    handshake, it answers a new configuration when the files changed since the last load
    (three stat calls otherwise), and None (keep the current one) while they are unchanged
    or inconsistent."""

    def __init__(self, files: TlsFiles, require_client_auth: bool = True) -> None:
        self.files = files
        self._require_client_auth = require_client_auth
        self._loaded = files.signature()
        self._rejected: tuple | None = None
        self.reloads = 0
        self.initial = self._configuration(files.read_consistent())

    @staticmethod
    def _configuration(material: tuple[bytes, bytes, bytes]):
        cert, key, ca = material
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def __call__(self):
        signature = None
        try:
            signature = self.files.signature()
            if signature in (self._loaded, self._rejected):
                return None
            configuration = self._configuration(self.files.read_consistent())
        except (OSError, ValueError) as error:
            self._rejected = signature  # warn once per state of the files
            log.warning("keeping the current certificate of %s: %s", self.files.cert, error)
            return None
        self._loaded = signature
        self.reloads += 1
        log.info("reloaded certificate %s", self.files.cert)
        return configuration

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self, require_client_authentication=self._require_client_auth)


def server_credentials(
    files: TlsFiles, *, require_client_auth: bool = True
) -> grpc.ServerCredentials:
    """Credentials presenting `files.cert`; clients must present a certificate from `files.ca`.

    With require_client_auth=False the server does not ask for a client certificate (for a
    port that only serves health checks to a kubelet, say). The files are re-read at the
    first handshake after they change (see ServerCertificates).
    """
    return ServerCertificates(files, require_client_auth).credentials()


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


class ReloadingChannel:
    """A channel to `target` as `identity` that is rebuilt when the TLS files change.

    `refresh()` (cheap: three stat calls) swaps in a channel with the new files and closes
    the old one once its in-flight calls finish (at most `grace` seconds), so a rotation
    drops no call. Holders read `.channel` (or stubs rebuilt from it) per call.

    With `ready_first`, the new channel takes over only once it has connected (READY, seen by
    a later `refresh()`), or at once when the old one is not connected either: a connected
    old channel keeps serving meanwhile (certificates are checked at the handshake only), so
    no call waits behind a new channel that cannot connect, and one not READY within
    `ready_wait` seconds is built again. For holders that call `refresh()` every few seconds.
    """

    def __init__(self, target: str, files: TlsFiles, identity: str, grace: float = 30.0,
                 ready_first: bool = False, ready_wait: float = 10.0) -> None:
        self.target = target
        self.files = files
        self.identity = identity
        self.grace = grace
        self.ready_first = ready_first
        self.ready_wait = ready_wait
        self._loaded = files.signature()
        self.channel = self._build(files.read_consistent())
        self._pending: _PendingChannel | None = None
        self._closing: set[asyncio.Task] = set()

    def _build(self, material: tuple[bytes, bytes, bytes]) -> grpc.aio.Channel:
        cert, key, ca = material
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert)
        return grpc.aio.secure_channel(self.target, credentials,
                                       options=channel_options(self.identity))

    def refresh(self) -> bool:
        """Build a channel with the files if they changed and agree, and swap it in (with
        `ready_first`, once it is READY or the old one is not). True when one was swapped in."""
        swapped = self._take_over()  # a pending channel that is ready, before newer files
        now = asyncio.get_running_loop().time()
        try:
            signature = self.files.signature()
            pending = self._pending
            if pending is not None and (signature != pending.signature
                                        or now - pending.since >= self.ready_wait):
                self._close_later(pending.channel, 0)  # files changed again, or it is stuck
                self._pending = None
            if self._pending is None and signature != self._loaded:
                self._pending = _PendingChannel(self._build(self.files.read_consistent()),
                                                signature, now)
        except (OSError, ValueError) as error:
            log.warning("keeping the channel to %s: %s", self.identity, error)
        return self._take_over() or swapped

    def _take_over(self) -> bool:
        """Swap the pending channel in if it may take over now; True when it did."""
        pending = self._pending
        if pending is None:
            return False
        ready = grpc.ChannelConnectivity.READY
        if self.ready_first and pending.channel.get_state(try_to_connect=True) != ready \
                and self.channel.get_state() == ready:
            return False
        self._pending = None
        self._close_later(self.channel, self.grace)
        self.channel, self._loaded = pending.channel, pending.signature
        log.info("new certificates for the channel to %s at %s", self.identity, self.target)
        return True

    def _close_later(self, channel: grpc.aio.Channel, grace: float) -> None:
        task = asyncio.get_running_loop().create_task(channel.close(grace))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        await self.channel.close()
        if self._pending is not None:
            await self._pending.channel.close()
        await asyncio.gather(*self._closing, return_exceptions=True)


@dataclass
class _PendingChannel:
    """A channel built with new files, not yet swapped in."""
    channel: grpc.aio.Channel
    signature: tuple
    since: float


def server_ssl_context(files: TlsFiles, require_client_cert: bool, alpn: str) -> ssl.SSLContext:
    """TLS presenting `files.cert` for a server of our own (HTTP/1.1 or HTTP/2, by `alpn`).
    Clients are asked for a certificate from `files.ca`: required, or optional (then a caller
    may authenticate with a bearer token instead). The files are re-read at the first
    handshake after they change; a key that does not match its certificate is not loaded."""
    return _ReloadingContext(files, require_client_cert, alpn).initial


class _ReloadingContext:
    def __init__(self, files: TlsFiles, require_client_cert: bool, alpn: str) -> None:
        self._files = files
        self._mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        self._alpn = alpn
        self._loaded = files.signature()
        self._current = self.initial = self._build()
        self.initial.sni_callback = self._choose

    def _build(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = self._mode
        context.load_verify_locations(cafile=self._files.ca)
        context.load_cert_chain(self._files.cert, self._files.key)  # refuses a mismatched pair
        context.set_alpn_protocols([self._alpn])
        return context

    def _choose(self, ssl_object, server_name, context) -> None:
        try:
            signature = self._files.signature()
            if signature != self._loaded:
                self._current = self._build()
                self._loaded = signature
                log.info("reloaded certificate %s for %s", self._files.cert, self._alpn)
        except (OSError, ValueError) as error:
            log.warning("keeping the current %s certificate: %s", self._alpn, error)
        if self._current is not self.initial:
            ssl_object.context = self._current
