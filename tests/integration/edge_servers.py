"""Servers of one kind, `grpc.aio.server()` or the services' own (`Http2Server`), on loopback
port 0 with mutual TLS and the dev CA's "ingress" certificate, and client channels to them:
what the `edge` fixture gives the tests of the services' gRPC server and of the hops' HTTP/2
client."""

import random

import grpc

from meshserve.common.http2_client import Http2Channel, client_ssl_context
from meshserve.common.server import SERVER_OPTIONS
from meshserve.common.tls import TlsFiles, channel_credentials, channel_options, server_credentials

SERVICE = "test.Edge"
MiB = 1 << 20


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def new_server(kind: str, options: list, files: TlsFiles, **own):
    """(server, port credentials) of `kind`; `own`: arguments only the own server takes."""
    if kind == "grpc.aio":
        return grpc.aio.server(options=options), server_credentials(files)
    from meshserve.common.http2_server import Http2Server, server_ssl_context

    return (Http2Server(options=options, **own),
            server_ssl_context(files, require_client_cert=True))


class Edge:
    """Servers of one kind and client channels to them, all closed by `close()`."""

    def __init__(self, kind: str, cert_dir) -> None:
        self.kind = kind
        self.cert_dir = cert_dir
        self.servers: list = []
        self.channels: list[grpc.aio.Channel] = []

    async def start(self, methods: dict, options: list = SERVER_OPTIONS, **own):
        """A started server answering `methods` of SERVICE; (server, target)."""
        server, credentials = new_server(
            self.kind, options, TlsFiles.for_identity(self.cert_dir, "ingress"), **own)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, methods),))
        port = server.add_secure_port("127.0.0.1:0", credentials)
        assert port > 0
        self.servers.append(server)
        await server.start()
        return server, f"127.0.0.1:{port}"

    def channel(self, target: str, credentials=None, **kwargs) -> grpc.aio.Channel:
        """A channel presenting the "client" certificate (or `credentials`) to "ingress"."""
        if credentials is None:
            credentials = channel_credentials(TlsFiles.for_identity(self.cert_dir, "client"))
        channel = grpc.aio.secure_channel(
            target, credentials, options=channel_options("ingress"), **kwargs)
        self.channels.append(channel)
        return channel

    async def connect(self, methods: dict, options: list = SERVER_OPTIONS, **kwargs):
        _, target = await self.start(methods, options)
        return self.channel(target, **kwargs)

    async def close(self) -> None:
        try:
            for channel in self.channels:
                await channel.close()
        finally:
            for server in self.servers:
                await server.stop(None)

    def own_channel(self, target: str, identity: str = "ingress") -> Http2Channel:
        """The hops' own HTTP/2 client, presenting the "client" certificate to `identity`."""
        context = client_ssl_context(TlsFiles.for_identity(self.cert_dir, "client"))
        channel = Http2Channel(target, context, identity)
        self.channels.append(channel)
        return channel
