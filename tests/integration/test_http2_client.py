"""`Http2Channel` (meshserve.common.http2_client): streaming calls as a grpcio channel makes
them, against gRPC's own server (`grpc.aio.server()`) and the project's (`Http2Server`).

Each server listens on loopback port 0 with mutual TLS and the dev CA's "ingress"
certificate; the client presents the "client" certificate and expects "ingress". Checked:
messages both ways with metadata, messages larger than every window (and the read buffers
they grew given back), messages written in pieces, statuses (abort with details, an unknown
method), cancellation reaching the server, new certificates (a new connection, the old one
closing after its calls), a server of the wrong identity, no server (and the backoff after
it), keepalive dropping a silent server, and the services refusing a target the client
cannot dial.
"""

import asyncio
import ssl
import subprocess
import sys

import grpc
import pytest

from meshserve.common import http2_client, http2_connection
from meshserve.common.http2_client import address, client_ssl_context
from meshserve.common.http2_server import server_ssl_context
from meshserve.common.tls import TlsFiles
from tests.integration.edge_servers import Edge, MiB, method, payload
from tests.polling import until

TIMEOUT_S = 10


async def serve(edge: Edge, methods: dict) -> str:
    """A started server of the edge's kind answering `methods`; its target."""
    _, target = await edge.start(methods)
    return target


def streaming(fn):
    return grpc.stream_stream_rpc_method_handler(fn)


async def test_a_stream_carries_messages_both_ways_with_its_metadata(edge):
    seen = {}

    async def echo(requests, context):
        seen.update(context.invocation_metadata())
        async for request in requests:
            yield request[::-1]

    channel = edge.own_channel(await serve(edge, {"Echo": streaming(echo)}))
    call = channel.stream_stream(method("Echo"))(
        metadata=(("x-pin", "2"), ("trace-bin", b"\x00\xff")))
    for n in range(5):
        await call.write(f"message {n}".encode())
        assert await asyncio.wait_for(call.read(), TIMEOUT_S) == f"message {n}".encode()[::-1]
    await call.done_writing()
    assert await asyncio.wait_for(call.read(), TIMEOUT_S) is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    assert seen["x-pin"] == "2" and seen["trace-bin"] == b"\x00\xff"


async def test_messages_larger_than_every_window_go_both_ways(edge):
    """6 MiB messages: past the default 64 KiB window, the 4 MiB stream window and the
    1 MiB frame, each way, several in flight."""
    async def echo(requests, context):
        async for request in requests:
            yield request

    channel = edge.own_channel(await serve(edge, {"Echo": streaming(echo)}))
    call = channel.stream_stream(method("Echo"))()
    sent = [payload(6 * MiB, seed) for seed in range(3)]
    for message in sent:
        await asyncio.wait_for(call.write(message), TIMEOUT_S)
    for message in sent:
        assert await asyncio.wait_for(call.read(), TIMEOUT_S) == message
    await call.done_writing()
    assert await asyncio.wait_for(call.read(), TIMEOUT_S) is grpc.aio.EOF


@pytest.mark.parametrize("sizes", [
    (9, 30, 200),  # small: joined into one piece
    (9, 2_000) * 20,  # small pieces that make a large message: joined too
    (9, 3, 49_152, 40, 3, 49_152, 40),  # large pieces kept apart, the small between joined
    (9, 6 * MiB, 5, 300_000),  # pieces past the windows and the frame
])
async def test_a_message_written_in_pieces_arrives_as_their_join(edge, sizes):
    async def echo(requests, context):
        async for request in requests:
            yield request

    channel = edge.own_channel(await serve(edge, {"Echo": streaming(echo)}))
    call = channel.stream_stream(method("Echo"))()
    pieces = [payload(size, seed) for seed, size in enumerate(sizes)]
    pieces[1] = memoryview(pieces[1])  # a view, as a forwarded group's body is
    for _ in range(2):
        await asyncio.wait_for(call.write(pieces), TIMEOUT_S)
    for _ in range(2):
        assert await asyncio.wait_for(call.read(), TIMEOUT_S) == b"".join(pieces)
    await call.done_writing()
    assert await asyncio.wait_for(call.read(), TIMEOUT_S) is grpc.aio.EOF


async def test_a_message_in_pieces_past_the_limit_is_refused_by_its_whole_size(edge,
                                                                             monkeypatch):
    monkeypatch.setattr(http2_client, "MAX_MESSAGE_BYTES", 1_000)
    channel = edge.own_channel(await serve(edge, {"Echo": streaming(echo_each)}))
    call = channel.stream_stream(method("Echo"))()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await asyncio.wait_for(call.write([b"x" * 600, b"y" * 600]), TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.details() == "Sent message larger than max (1200 vs. 1000)"


async def test_a_read_buffer_grown_by_large_frames_is_given_back_once_idle(edge, monkeypatch):
    """A 6 MiB message each way grows the read buffer of the client's connection (and of the
    own server's) past KEEP_BUFFER to hold whole 1 MiB frames; once nothing has been read for
    SHRINK_AFTER_S it is READ_ROOM again, and the connection still carries messages."""
    monkeypatch.setattr(http2_connection, "SHRINK_AFTER_S", 0.2)
    sizes: dict[int, list[int]] = {}  # each connection's buffers, by id
    use = http2_connection.Http2Connection._use

    def recorded(connection, buffer: bytearray) -> None:
        sizes.setdefault(id(connection), []).append(len(buffer))
        use(connection, buffer)

    monkeypatch.setattr(http2_connection.Http2Connection, "_use", recorded)
    server, target = await edge.start({"Echo": streaming(echo_each)})
    channel = edge.own_channel(target)
    call = channel.stream_stream(method("Echo"))()
    message = payload(6 * MiB, 1)
    await asyncio.wait_for(call.write(message), TIMEOUT_S)
    assert await asyncio.wait_for(call.read(), TIMEOUT_S) == message
    buffers = [channel._connection]
    if edge.kind == "http2":
        [connection] = server.connections
        buffers.append(connection)
    assert all(max(sizes[id(c)]) > http2_connection.KEEP_BUFFER for c in buffers)
    await until(lambda: all(len(c._buffer) == http2_connection.READ_ROOM for c in buffers),
                TIMEOUT_S, "the read buffers given back")
    await asyncio.wait_for(call.write(b"small"), TIMEOUT_S)
    assert await asyncio.wait_for(call.read(), TIMEOUT_S) == b"small"
    await call.done_writing()


async def echo_each(requests, context):
    async for request in requests:
        yield request


async def test_an_abort_reaches_the_caller_with_its_code_and_details(edge):
    async def refuse(requests, context):
        async for _ in requests:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours: ünïcode 100%")
        yield b""

    channel = edge.own_channel(await serve(edge, {"Refuse": streaming(refuse)}))
    call = channel.stream_stream(method("Refuse"))()
    await call.write(b"x")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await asyncio.wait_for(call.read(), TIMEOUT_S)
    assert failed.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert failed.value.details() == "not yours: ünïcode 100%"
    assert await call.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError):
        await call.write(b"more")


async def test_after_renew_new_calls_take_a_new_connection_and_the_old_one_closes(edge):
    """Rotated certificates: the open call finishes on its connection, which then closes;
    the next call opens a connection with the new context."""
    async def echo(requests, context):
        async for request in requests:
            yield request

    channel = edge.own_channel(await serve(edge, {"Echo": streaming(echo)}))
    old = channel.stream_stream(method("Echo"))()
    await old.write(b"before")
    assert await asyncio.wait_for(old.read(), TIMEOUT_S) == b"before"
    channel.renew(client_ssl_context(TlsFiles.for_identity(edge.cert_dir, "client")))
    new = channel.stream_stream(method("Echo"))()
    await new.write(b"after")
    assert await asyncio.wait_for(new.read(), TIMEOUT_S) == b"after"
    assert new.connection is not old.connection
    await old.write(b"still")
    assert await asyncio.wait_for(old.read(), TIMEOUT_S) == b"still"
    await old.done_writing()
    assert await asyncio.wait_for(old.read(), TIMEOUT_S) is grpc.aio.EOF
    await until(lambda: not old.connection.usable() and old.connection._transport is None,
                TIMEOUT_S, "the old connection closing")
    assert new.connection.usable()


async def test_an_unknown_method_is_unimplemented(edge):
    channel = edge.own_channel(await serve(edge, {}))
    call = channel.stream_stream(method("Missing"))()
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await asyncio.wait_for(call.read(), TIMEOUT_S)
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_cancelled_call_ends_at_the_server_too(edge):
    reading, ended = asyncio.Event(), asyncio.Event()

    async def hold(requests, context):
        try:
            async for _ in requests:
                reading.set()
            await asyncio.Event().wait()  # until cancelled
        finally:
            ended.set()
        yield b""

    channel = edge.own_channel(await serve(edge, {"Hold": streaming(hold)}))
    call = channel.stream_stream(method("Hold"))()
    await call.write(b"x")
    await asyncio.wait_for(reading.wait(), TIMEOUT_S)
    assert call.cancel()
    await asyncio.wait_for(ended.wait(), TIMEOUT_S)
    assert await call.code() == grpc.StatusCode.CANCELLED
    assert not call.cancel()


async def test_a_server_of_another_identity_is_unavailable(edge):
    channel = edge.own_channel(await serve(edge, {}), identity="router")
    call = channel.stream_stream(method("Echo"))()
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await asyncio.wait_for(call.read(), TIMEOUT_S)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "could not connect to router at" in failed.value.details()
    assert "certificate" in failed.value.details()


async def test_with_no_server_calls_fail_unavailable_and_at_once_during_the_backoff(cert_dir):
    edge = Edge("http2", cert_dir)
    target = await serve(edge, {})
    await edge.servers[0].stop(None)
    channel = edge.own_channel(target)
    try:
        first = channel.stream_stream(method("Echo"))()
        assert await asyncio.wait_for(first.code(), TIMEOUT_S) == grpc.StatusCode.UNAVAILABLE
        assert (await first.details()).startswith(f"could not connect to ingress at {target}")
        again = channel.stream_stream(method("Echo"))()
        assert again.done()  # no second attempt before the backoff has passed
        assert await again.details() == await first.details()
    finally:
        await edge.close()


async def test_keepalive_drops_a_server_that_stops_answering(cert_dir, monkeypatch):
    """A server that completes TLS and then says nothing, not even to a PING."""
    monkeypatch.setattr(http2_client, "KEEPALIVE_TIME_MS", 200)
    monkeypatch.setattr(http2_client, "KEEPALIVE_TIMEOUT_MS", 200)
    received = bytearray()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            received.extend(chunk)
        writer.close()

    server = await asyncio.start_server(
        silent, "127.0.0.1", 0,
        ssl=server_ssl_context(TlsFiles.for_identity(cert_dir, "ingress")))
    port = server.sockets[0].getsockname()[1]
    edge = Edge("http2", cert_dir)
    channel = edge.own_channel(f"127.0.0.1:{port}")
    try:
        call = channel.stream_stream(method("Echo"))()
        await call.write(b"x")
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await asyncio.wait_for(call.read(), TIMEOUT_S)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "broke" in failed.value.details()
        assert b"keepaliv" in received  # the PING it left unanswered
    finally:
        await edge.close()
        server.close()


@pytest.mark.parametrize("target, expected", [
    ("127.0.0.1:7002", ("127.0.0.1", 7002)),
    ("router.mesh.svc:7002", ("router.mesh.svc", 7002)),
    ("dns:///router.mesh.svc:7002", ("router.mesh.svc", 7002)),
    ("[::1]:50051", ("::1", 50051)),
])
def test_a_target_is_host_and_port(target, expected):
    assert address(target) == expected


@pytest.mark.parametrize("target", ["router", "router:", ":7002", "unix:///tmp/socket"])
def test_a_target_without_host_and_port_is_refused(target):
    with pytest.raises(ValueError, match="is not host:port"):
        address(target)


def test_the_client_context_requires_the_servers_certificate(cert_dir):
    context = client_ssl_context(TlsFiles.for_identity(cert_dir, "client"))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


@pytest.mark.parametrize("service, flag", [("ingress", "--router"), ("batcher", "--compute")])
def test_a_service_refuses_an_upstream_it_cannot_dial(service, flag):
    """The target is checked when the flags are read, not when the first group is sent."""
    done = subprocess.run([sys.executable, "-m", "meshserve.tools.cli", service,
                           f"{flag}=unix:///tmp/socket", "--model-repository=/nonexistent"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"argument {flag}: target 'unix:///tmp/socket' is not host:port" in done.stderr
