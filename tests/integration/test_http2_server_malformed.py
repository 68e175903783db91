"""The services' own gRPC server (`Http2Server`, and `Service` with its caller check) given
traffic a peer of the mesh should never send: each case is answered with a status, or the
connection closed with a GOAWAY, naming what was wrong; nothing is held past its bound and no
other call is lost. Each server runs on loopback port 0 with mutual TLS (the dev CA); clients
write HTTP/2 frames themselves, or are real grpcio channels."""

import asyncio
import logging
import socket
import ssl
from urllib.parse import unquote

import grpc
import hpack
import pytest

from meshserve.common import http2_frames as h2
from meshserve.common.http2_server import server_ssl_context
from meshserve.common.identity import Callers
from meshserve.common.server import HealthServicer, Service
from meshserve.common.tls import TlsFiles, secure_channel
from meshserve.protocol import health_pb2
from tests.integration.edge_servers import method, payload
from tests.integration.test_http2_server import (
    TIMEOUT_S,
    Replies,
    call_headers,
    read_frame,
    reverse,
    settled,
    unary,
)
from tests.polling import until

DEADLINE_EXCEEDED = str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
RESOURCE_EXHAUSTED = str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
INTERNAL = str(grpc.StatusCode.INTERNAL.value[0])
PERMISSION_DENIED = str(grpc.StatusCode.PERMISSION_DENIED.value[0])


async def connect(cert_dir, target: str, identity: str = "client"):
    """(reader, writer) of a TLS connection presenting `identity`'s certificate, ALPN h2."""
    host, port = target.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(cert_dir / "ca.crt"))
    context.check_hostname = False
    context.load_cert_chain(cert_dir / f"{identity}.crt", cert_dir / f"{identity}.key")
    context.set_alpn_protocols(["h2"])
    sock = socket.create_connection((host, int(port)))
    sock.setblocking(False)
    return await asyncio.open_connection(sock=sock, ssl=context, server_hostname="x")


def message(trailers: dict[str, str]) -> str:
    return unquote(trailers.get("grpc-message", ""))


async def goaway_of(reader) -> tuple[int, bytes]:
    """The GOAWAY the server closes the connection with: (error code, its debug text)."""
    while True:
        kind, _, _, frame = await read_frame(reader)
        if kind == h2.GOAWAY:
            return int.from_bytes(frame[4:8], "big"), frame[8:]


def calls_open(server) -> int:
    return sum(len(connection.calls) for connection in server.connections)


async def test_a_call_whose_deadline_passes_before_its_handler_runs_is_answered(own):
    """A deadline so short that it may pass before the handler's task first runs (grpc-timeout
    1n): every call is answered, DEADLINE_EXCEEDED where the handler had not run in time, and
    let go. Before, a handler cancelled before it ran never answered, and its call and
    request stayed held for as long as the connection lived."""
    server, target = await own.start({"Echo": unary(reverse)})
    reader, writer = await connect(own.cert_dir, target)
    await settled(reader, writer)
    encoder, streams = hpack.Encoder(), range(1, 101, 2)
    body = h2.message(payload(16 << 10, 1))
    headers = [(":method", "POST"), (":scheme", "https"), (":path", method("Echo")),
               (":authority", "x"), ("content-type", "application/grpc"),
               ("te", "trailers"), ("grpc-timeout", "1n")]
    writer.write(b"".join(h2.frame(h2.HEADERS, h2.END_HEADERS, stream, encoder.encode(headers))
                          + h2.frame(h2.DATA, h2.END_STREAM, stream, body)
                          for stream in streams))
    replies = Replies(reader)
    try:
        await replies.until_ended(*streams)
    finally:
        writer.close()
    answered = {(f["grpc-status"], message(f)) for f in replies.trailers.values()}
    assert (DEADLINE_EXCEEDED, "Deadline Exceeded") in answered  # some ran in time
    assert answered <= {(DEADLINE_EXCEEDED, "Deadline Exceeded"), ("0", "")}
    await until(lambda: calls_open(server) == 0, TIMEOUT_S, "every call let go")


async def test_binary_metadata_that_is_not_base64_fails_its_call_alone(own):
    """A `-bin` header that does not decode is INTERNAL naming the header, and the connection
    goes on serving its other calls (before, the exception ended the connection, with every
    call on it, and logged a traceback)."""
    _, target = await own.start({"Echo": unary(reverse)})
    reader, writer = await connect(own.cert_dir, target)
    await settled(reader, writer)
    encoder = hpack.Encoder()
    bad = encoder.encode([(":method", "POST"), (":scheme", "https"), (":path", method("Echo")),
                          (":authority", "x"), ("content-type", "application/grpc"),
                          ("x-trace-bin", "A")])
    writer.write(h2.frame(h2.HEADERS, h2.END_HEADERS, 1, bad)
                 + h2.frame(h2.DATA, h2.END_STREAM, 1, h2.message(b"ab"))
                 + h2.frame(h2.HEADERS, h2.END_HEADERS, 3, call_headers(encoder, "Echo"))
                 + h2.frame(h2.DATA, h2.END_STREAM, 3, h2.message(b"ab")))
    replies = Replies(reader)
    try:
        await replies.until_ended(1, 3)
    finally:
        writer.close()
    assert replies.trailers[1]["grpc-status"] == INTERNAL
    assert message(replies.trailers[1]).startswith(
        "metadata 'x-trace-bin' is not valid base64: ")
    assert replies.trailers[3]["grpc-status"] == "0"
    assert replies.data[3] == h2.message(b"ba")


@pytest.mark.parametrize(("frames", "code", "says"), [
    (h2.settings_frame({h2.MAX_FRAME_SIZE: 0}), h2.PROTOCOL_ERROR,
     b"SETTINGS_MAX_FRAME_SIZE of 0 (from 16384 to 16777215)"),
    (h2.settings_frame({h2.MAX_FRAME_SIZE: 1 << 24}), h2.PROTOCOL_ERROR,
     b"SETTINGS_MAX_FRAME_SIZE of 16777216 (from 16384 to 16777215)"),
    (h2.settings_frame({h2.ENABLE_PUSH: 2}), h2.PROTOCOL_ERROR,
     b"SETTINGS_ENABLE_PUSH of 2 (0 or 1)"),
    (h2.window_update(0, (1 << 31) - 1), h2.FLOW_CONTROL_ERROR,
     b"a window update past 2147483647 bytes on the connection"),
    (h2.frame(h2.PING, 0, 0, b"abc"), h2.FRAME_SIZE_ERROR, b"PING of 3 bytes (it has 8)"),
    (h2.frame(h2.PING, 0, 1, bytes(8)), h2.PROTOCOL_ERROR, b"PING on stream 1"),
    (h2.frame(h2.RST_STREAM, 0, 1, b"\x00\x08"), h2.FRAME_SIZE_ERROR,
     b"RST_STREAM of 2 bytes (it has 4)"),
], ids=["frame-size-0", "frame-size-2^24", "enable-push-2", "window-overflow", "ping-3-bytes",
        "ping-on-a-stream", "rst-stream-2-bytes"])
async def test_frames_the_protocol_forbids_close_the_connection_saying_why(own, caplog, frames,
                                                                         code, says):
    """RFC 9113's limits on SETTINGS values, windows and frame sizes: a GOAWAY with the error
    code and what was wrong, and the server serves the next connection. Before, a frame size
    of 0 left every answer unsent (and logged a traceback), and the rest were taken."""
    _, target = await own.start({"Echo": unary(reverse)})
    reader, writer = await connect(own.cert_dir, target)
    await settled(reader, writer)
    with caplog.at_level(logging.WARNING):
        writer.write(frames + h2.frame(h2.HEADERS, h2.END_HEADERS, 1,
                                       call_headers(hpack.Encoder(), "Echo"))
                     + h2.frame(h2.DATA, h2.END_STREAM, 1, h2.message(b"ab")))
        try:
            assert await goaway_of(reader) == (code, says)
        finally:
            writer.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert await own.channel(target).unary_unary(method("Echo"))(
        b"ab", timeout=TIMEOUT_S) == b"ba"


async def test_a_unary_request_whose_stream_does_not_end_is_bounded_and_given_up(own):
    """A unary call's whole request message with no END_STREAM after it: no handler runs (so
    nothing checks the caller's request) until the stream ends. Such messages count with the
    bytes still arriving, under the same limit, and one whose stream stays open past the
    stall timeout is answered DEADLINE_EXCEEDED and let go. Before, they counted nowhere and
    were held until the connection closed: 40 of 4 MiB each grew a batcher by 160 MiB."""
    server, target = await own.start({"Echo": unary(reverse)}, max_unfinished=1 << 20,
                                     stall_timeout=1.0)
    reader, writer = await connect(own.cert_dir, target)
    await settled(reader, writer)
    encoder, body = hpack.Encoder(), h2.message(payload(600 << 10, 2))
    for stream in (1, 3):  # 600 KiB each, whole, never ended: 1,200 KiB in all
        writer.write(h2.frame(h2.HEADERS, h2.END_HEADERS, stream, call_headers(encoder, "Echo")))
        for start in range(0, len(body), 16 << 10):
            writer.write(h2.frame(h2.DATA, 0, stream, body[start:start + (16 << 10)]))
    replies = Replies(reader)
    try:
        await replies.until_ended(3)
        assert replies.trailers[3]["grpc-status"] == RESOURCE_EXHAUSTED
        assert "past its limit of 1048576" in message(replies.trailers[3])
        assert server.unfinished == 600 << 10  # stream 1's message, held
        await replies.until_ended(1)
    finally:
        writer.close()
    assert (replies.trailers[1]["grpc-status"], message(replies.trailers[1])) == (
        DEADLINE_EXCEEDED, "the request did not end: its stream stayed open 1 s after its "
                           "message")
    assert server.unfinished == 0


async def test_a_streamed_request_that_does_not_parse_ends_its_call_invalid_argument(own):
    """A stream's request that is not the method's message ends the call INVALID_ARGUMENT
    saying so, also when the handler reads its requests from a task of its own (as the
    control plane's xDS server does): before, that task died unseen and the call hung."""
    async def reading_apart(requests, context):
        async def read() -> None:
            async for _ in requests:
                pass

        reader = asyncio.ensure_future(read())
        try:
            await asyncio.Event().wait()  # answers come from elsewhere: never here
            yield b""
        finally:
            reader.cancel()

    handler = grpc.stream_stream_rpc_method_handler(
        reading_apart, request_deserializer=health_pb2.HealthCheckRequest.FromString)
    channel = await own.connect({"Watch": handler})
    call = channel.stream_stream(method("Watch"))(timeout=TIMEOUT_S)
    await call.write(b"\xff\xff\xff")
    assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await call.details()).startswith("request is not a valid protobuf message: ")


async def test_a_caller_the_server_does_not_admit_is_refused_before_its_request_is_read(
        cert_dir):
    """An internal server refuses a caller of another identity as the call's headers arrive:
    PERMISSION_DENIED naming it, before its request message is whole (nothing of it is held
    or parsed); health checks stay open to it, and the caller it admits is served."""
    async def echo(request: bytes, context) -> bytes:
        return request

    def register(server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Edge", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))

    health = HealthServicer()
    health.set(True)
    service = Service("127.0.0.1:0",
                      server_ssl_context(TlsFiles.for_identity(cert_dir, "compute")),
                      register, health, callers=Callers("compute", frozenset({"batcher"})))
    target = f"127.0.0.1:{await service.start()}"
    try:
        reader, writer = await connect(cert_dir, target, "router")
        await settled(reader, writer)
        encoder = hpack.Encoder()
        body = h2.message(payload(1 << 20, 4))
        writer.write(h2.frame(h2.HEADERS, h2.END_HEADERS, 1, call_headers(encoder, "Echo"))
                     + h2.frame(h2.DATA, 0, 1, body[:512 << 10]))  # half of it, for now
        replies = Replies(reader)
        await replies.until_ended(1)
        assert (replies.trailers[1]["grpc-status"], message(replies.trailers[1])) == (
            PERMISSION_DENIED, "identity 'router' may not call compute; allowed: batcher")
        assert service.server.unfinished == 0
        writer.write(h2.frame(h2.HEADERS, h2.END_HEADERS, 3, encoder.encode([
            (":method", "POST"), (":scheme", "https"),
            (":path", "/grpc.health.v1.Health/Check"), (":authority", "x"),
            ("content-type", "application/grpc"), ("te", "trailers")]))
                     + h2.frame(h2.DATA, h2.END_STREAM, 3, h2.message(b"")))
        await replies.until_ended(3)
        writer.close()
        assert replies.trailers[3]["grpc-status"] == "0"
        async with secure_channel(target, TlsFiles.for_identity(cert_dir, "batcher"),
                                  "compute") as channel:
            assert await channel.unary_unary(method("Echo"))(b"ab", timeout=TIMEOUT_S) == b"ab"
    finally:
        await service.stop(0)
