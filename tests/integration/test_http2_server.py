"""`Http2Server` (meshserve.common.http2_server) behaves as `grpc.aio.server()` does.

Every case runs against both servers (the `edge` fixture is parametrized over "grpc.aio", the
reference, and "http2", the server written on HTTP/2), each on loopback port 0 over mutual
TLS with the dev CA's "ingress" certificate, and is called by a real grpcio `grpc.aio`
channel presenting the "client" certificate. Checked: unary calls and their metadata,
statuses (abort, set_code, unknown method, a raising handler), deadlines, client
cancellation, large messages and the receive limit, the four streaming shapes, concurrency,
gzip compression, the peer's identity, stop with grace, a client without a certificate,
and protobuf serializers. The bounds on a client that misbehaves (streams open at once,
request bytes still arriving, answers it does not read) are checked on the own server alone,
some with a client that writes HTTP/2 frames itself.
"""

import asyncio
import socket
import ssl
import time
from urllib.parse import unquote

import grpc
import hpack
import pytest

from meshserve.common import http2_frames as h2
from meshserve.common.certificates import identity_of, peer_identity_of
from meshserve.common.server import SERVER_OPTIONS
from meshserve.protocol import health_pb2
from tests.integration.edge_servers import MiB, method, payload
from tests.polling import until

TIMEOUT_S = 10
CLIENT_IDENTITY = "client/developer"  # the SPIFFE identity of the dev CA's "client" leaf


def unary(fn):
    return grpc.unary_unary_rpc_method_handler(fn)


async def reverse(request: bytes, context) -> bytes:
    return request[::-1]


async def failure(call) -> grpc.aio.AioRpcError:
    """The error `call` (an awaitable) fails with; AssertionError when it succeeds."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def test_unary_echo_sees_client_metadata(edge):
    seen = {}

    async def handler(request, context):
        seen.update((key, value) for key, value in context.invocation_metadata())
        return request[::-1]

    channel = await edge.connect({"Echo": unary(handler)})
    metadata = (("x-key", "v"), ("x-bin", b"\x00\x01"))
    reply = await channel.unary_unary(method("Echo"))(b"hello", metadata=metadata,
                                                       timeout=TIMEOUT_S)
    assert reply == b"olleh"
    assert seen["x-key"] == "v"
    assert seen["x-bin"] == b"\x00\x01"


async def test_abort_sends_code_details_and_trailers(edge):
    async def handler(request, context):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "field 'x' is wrong",
                            (("retry-after-ms", "5"),))

    channel = await edge.connect({"Abort": unary(handler)})
    error = await failure(channel.unary_unary(method("Abort"))(b"", timeout=TIMEOUT_S))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "field 'x' is wrong"
    assert ("retry-after-ms", "5") in tuple(error.trailing_metadata())


async def test_set_code_and_details_without_abort(edge):
    async def handler(request, context):
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        context.set_details("not ready yet")
        return b"ignored"

    channel = await edge.connect({"SetCode": unary(handler)})
    error = await failure(channel.unary_unary(method("SetCode"))(b"", timeout=TIMEOUT_S))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "not ready yet"


async def test_unknown_method_is_unimplemented(edge):
    channel = await edge.connect({"Echo": unary(reverse)})
    error = await failure(channel.unary_unary(method("Missing"))(b"", timeout=TIMEOUT_S))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_raising_handler_is_unknown(edge):
    async def handler(request, context):
        raise RuntimeError("boom")

    channel = await edge.connect({"Raise": unary(handler)})
    error = await failure(channel.unary_unary(method("Raise"))(b"", timeout=TIMEOUT_S))
    assert error.code() == grpc.StatusCode.UNKNOWN


async def test_deadline_exceeded_and_time_remaining(edge):
    remaining = []

    async def slow(request, context):
        await asyncio.sleep(5)
        return b"late"

    async def fast(request, context):
        remaining.append(context.time_remaining())
        return b"ok"

    channel = await edge.connect({"Slow": unary(slow), "Fast": unary(fast)})
    started = time.monotonic()
    error = await failure(channel.unary_unary(method("Slow"))(b"", timeout=0.3))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.5
    assert await channel.unary_unary(method("Fast"))(b"", timeout=3) == b"ok"
    # grpc.aio reports up to ~10 ms more than the client's timeout (its clock and rounding).
    assert remaining and 2 < remaining[0] <= 3.1


async def test_client_cancellation_cancels_the_handler(edge):
    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(request, context):
        entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b"never"

    channel = await edge.connect({"Hang": unary(handler)})
    call = channel.unary_unary(method("Hang"))(b"", timeout=TIMEOUT_S)
    await until(entered.is_set, 5, "the handler started")
    assert call.cancel()
    await until(cancelled.is_set, 5, "the handler saw CancelledError")
    assert call.cancelled()


async def test_large_messages_both_ways(edge):
    received = []
    request, response = payload(6 * MiB, 1), payload(6 * MiB, 2)

    async def handler(message, context):
        received.append(message)
        return response

    channel = await edge.connect({"Big": unary(handler)})
    assert await channel.unary_unary(method("Big"))(request, timeout=30) == response
    assert received == [request]


@pytest.mark.parametrize(("compression", "fits", "too_big"), [
    (grpc.Compression.NoCompression, MiB, MiB + 1),
    (grpc.Compression.Gzip, MiB // 2, 4 * MiB)])  # 4 MiB of zeros: ~4 KiB on the wire
async def test_request_over_the_receive_limit_is_resource_exhausted(edge, compression, fits,
                                                                    too_big):
    calls = []

    async def handler(request, context):
        calls.append(len(request))
        return b"ok"

    # Replaced, not appended: with duplicate keys grpcio 1.85 keeps the first.
    limit = "grpc.max_receive_message_length"
    options = [*((k, v) for k, v in SERVER_OPTIONS if k != limit), (limit, MiB)]
    _, target = await edge.start({"Echo": unary(handler)}, options)
    echo = edge.channel(target, compression=compression).unary_unary(method("Echo"))
    assert await echo(bytes(fits), timeout=TIMEOUT_S) == b"ok"
    error = await failure(echo(bytes(too_big), timeout=TIMEOUT_S))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert calls == [fits]


async def test_bidi_stream_async_generator_echo(edge):
    async def handler(requests, context):
        async for message in requests:
            yield message

    channel = await edge.connect({"Bidi": grpc.stream_stream_rpc_method_handler(handler)})
    messages = [b"m%d" % i for i in range(200)]
    call = channel.stream_stream(method("Bidi"))(iter(messages), timeout=TIMEOUT_S)
    assert [reply async for reply in call] == messages
    assert await call.code() == grpc.StatusCode.OK


async def test_bidi_stream_read_write_ping_pong(edge):
    async def handler(requests, context):
        while (message := await context.read()) is not grpc.aio.EOF:
            await context.write(message.upper())

    channel = await edge.connect({"Pong": grpc.stream_stream_rpc_method_handler(handler)})
    call = channel.stream_stream(method("Pong"))(timeout=TIMEOUT_S)
    for i in range(20):  # each answer arrives before the next request is sent
        await call.write(b"ping %d" % i)
        assert await call.read() == b"PING %d" % i
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_server_streaming(edge):
    async def handler(request, context):
        for i in range(int(request)):
            yield b"item %d" % i

    channel = await edge.connect({"Items": grpc.unary_stream_rpc_method_handler(handler)})
    call = channel.unary_stream(method("Items"))(b"50", timeout=TIMEOUT_S)
    assert [reply async for reply in call] == [b"item %d" % i for i in range(50)]


async def test_client_streaming_sums_lengths(edge):
    async def handler(requests, context):
        total = 0
        async for message in requests:
            total += len(message)
        return str(total).encode()

    channel = await edge.connect({"Sum": grpc.stream_unary_rpc_method_handler(handler)})
    messages = [b"x" * n for n in range(1, 21)]
    assert await channel.stream_unary(method("Sum"))(iter(messages), timeout=TIMEOUT_S) == b"210"


async def test_concurrent_unary_calls_on_one_channel(edge):
    channel = await edge.connect({"Echo": unary(reverse)})
    echo = channel.unary_unary(method("Echo"))
    requests = [b"request-%03d" % i for i in range(300)]
    replies = await asyncio.gather(*(echo(r, timeout=30) for r in requests))
    assert replies == [r[::-1] for r in requests]


async def test_gzip_compressed_request_arrives_intact(edge):
    received = []

    async def handler(request, context):
        received.append(request)
        return request[::-1]

    _, target = await edge.start({"Echo": unary(handler)})
    channel = edge.channel(target, compression=grpc.Compression.Gzip)
    request = b"compress me " * 10_000
    assert await channel.unary_unary(method("Echo"))(request, timeout=TIMEOUT_S) == request[::-1]
    assert received == [request]


async def test_peer_identity_of_the_client_certificate(edge):
    seen = {}

    async def handler(request, context):
        seen["key"] = context.peer_identity_key()
        seen["identities"] = list(context.peer_identities())
        seen["pem"] = list(context.auth_context()["x509_pem_cert"])
        seen["identity"] = peer_identity_of(context)
        return b"ok"

    channel = await edge.connect({"Who": unary(handler)})
    assert await channel.unary_unary(method("Who"))(b"", timeout=TIMEOUT_S) == b"ok"
    assert seen["identity"] == CLIENT_IDENTITY
    assert seen["key"] == "x509_subject_alternative_name"
    assert f"spiffe://meshserve.local/{CLIENT_IDENTITY}".encode() in seen["identities"]
    assert seen["pem"] == [(edge.cert_dir / "client.crt").read_bytes()]
    assert identity_of(seen["pem"][0]) == CLIENT_IDENTITY


async def test_stop_with_grace_finishes_the_call_in_flight(edge):
    entered, release = asyncio.Event(), asyncio.Event()

    async def handler(request, context):
        entered.set()
        await release.wait()
        return b"finished"

    server, target = await edge.start({"Wait": unary(handler)})
    in_flight = asyncio.ensure_future(
        edge.channel(target).unary_unary(method("Wait"))(b"", timeout=TIMEOUT_S))
    await until(entered.is_set, 5, "the handler started")
    stopping = asyncio.ensure_future(server.stop(5))
    late = edge.channel(target).unary_unary(method("Wait"))(b"", timeout=TIMEOUT_S)
    assert (await failure(late)).code() != grpc.StatusCode.OK
    assert not in_flight.done() and not stopping.done()
    release.set()
    assert await asyncio.wait_for(in_flight, 5) == b"finished"
    await asyncio.wait_for(stopping, 5)


async def test_client_without_certificate_is_refused(edge):
    calls = []

    async def handler(request, context):
        calls.append(request)
        return b"ok"

    _, target = await edge.start({"Echo": unary(handler)})
    credentials = grpc.ssl_channel_credentials((edge.cert_dir / "ca.crt").read_bytes())
    channel = edge.channel(target, credentials=credentials)
    error = await failure(channel.unary_unary(method("Echo"))(b"", timeout=5))
    assert error.code() != grpc.StatusCode.OK
    assert calls == []


async def test_protobuf_serializers(edge):
    requests = []
    Request, Response = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse

    async def check(request, context):
        requests.append(request)
        return Response(status=Response.SERVING if request.service == "edge" else
                        Response.SERVICE_UNKNOWN)

    handler = grpc.unary_unary_rpc_method_handler(
        check, request_deserializer=Request.FromString,
        response_serializer=Response.SerializeToString)
    channel = await edge.connect({"Check": handler})
    stub = channel.unary_unary(method("Check"), request_serializer=Request.SerializeToString,
                               response_deserializer=Response.FromString)
    assert (await stub(Request(service="edge"), timeout=TIMEOUT_S)).status == Response.SERVING
    assert (await stub(Request(service="x"), timeout=TIMEOUT_S)).status == \
        Response.SERVICE_UNKNOWN
    assert [r.service for r in requests] == ["edge", "x"]


async def test_streamed_answers_beyond_the_clients_window(edge):
    """Five 3 MiB answers on one stream: more than a client's window, so the server must wait
    for the client's WINDOW_UPDATEs between them."""
    answers = [payload(3 * MiB, seed) for seed in range(5)]

    async def handler(request, context):
        for answer in answers:
            yield answer

    channel = await edge.connect({"Many": grpc.unary_stream_rpc_method_handler(handler)})
    call = channel.unary_stream(method("Many"))(b"", timeout=30)
    assert [reply async for reply in call] == answers


async def raw_connection(edge, target: str, receive_buffer: int = 0):
    """(reader, writer) of a TLS connection presenting the "client" certificate, ALPN h2,
    nothing sent yet; `receive_buffer`: the socket's SO_RCVBUF, set before it connects."""
    host, port = target.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(edge.cert_dir / "ca.crt"))
    context.check_hostname = False
    context.load_cert_chain(edge.cert_dir / "client.crt", edge.cert_dir / "client.key")
    context.set_alpn_protocols(["h2"])
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    return await asyncio.open_connection(sock=sock, ssl=context, server_hostname="ingress")


async def read_frame(reader) -> tuple[int, int, int, bytes]:
    """The next frame from the server: (type, flags, stream, payload)."""
    high, low, kind, flags, stream = h2.FRAME_HEADER.unpack(
        await asyncio.wait_for(reader.readexactly(9), TIMEOUT_S))
    return kind, flags, stream, await reader.readexactly(high << 16 | low)


async def settled(reader, writer, window: int = 16 * MiB) -> dict[int, int]:
    """Send the preface and our SETTINGS (each stream's window `window`, the connection's
    16 MiB); the server's SETTINGS, acknowledged (its limits now hold)."""
    writer.write(h2.PREFACE + h2.settings_frame({h2.INITIAL_WINDOW_SIZE: window})
                 + h2.window_update(0, 16 * MiB))
    while True:
        kind, flags, _, payload = await read_frame(reader)
        if kind == h2.SETTINGS and not flags & h2.ACK:
            writer.write(h2.frame(h2.SETTINGS, h2.ACK, 0))
            return h2.parse_settings(payload)


def call_headers(encoder: hpack.Encoder, name: str) -> bytes:
    return encoder.encode([(":method", "POST"), (":scheme", "https"), (":path", method(name)),
                           (":authority", "ingress"), ("content-type", "application/grpc"),
                           ("te", "trailers")])


class Replies:
    """What the server sends on a connection a test writes frames to, stream by stream: every
    header block decoded in order (HPACK keeps state across them)."""

    def __init__(self, reader) -> None:
        self.reader = reader
        self.decoder = hpack.Decoder()
        self.trailers: dict[int, dict[str, str]] = {}  # a stream's last header block
        self.data: dict[int, bytearray] = {}
        self.resets: dict[int, int] = {}  # RST_STREAM's error code
        self.pongs: set[bytes] = set()

    async def until(self, done) -> None:
        """Read frames until `done()`."""
        while not done():
            kind, flags, stream, payload = await read_frame(self.reader)
            if kind == h2.DATA:
                self.data.setdefault(stream, bytearray()).extend(payload)
            elif kind == h2.HEADERS:
                fields = dict(self.decoder.decode(h2.unpadded(flags, payload)))
                if flags & h2.END_STREAM:
                    self.trailers[stream] = fields
            elif kind == h2.RST_STREAM:
                self.resets[stream] = int.from_bytes(payload, "big")
            elif kind == h2.PING and flags & h2.ACK:
                self.pongs.add(payload)

    async def until_ended(self, *streams: int) -> None:
        """Until each of `streams` has its trailers or was reset."""
        await self.until(lambda: all(s in self.trailers or s in self.resets for s in streams))


async def test_bytes_that_are_not_http2_close_only_their_connection(edge):
    _, target = await edge.start({"Echo": unary(reverse)})
    channel = edge.channel(target)
    reader, writer = await raw_connection(edge, target)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 4)
    await writer.drain()
    await asyncio.wait_for(reader.read(), TIMEOUT_S)  # the server closes the connection
    writer.close()
    assert await channel.unary_unary(method("Echo"))(b"still", timeout=TIMEOUT_S) == b"llits"


def holding(running: list[int]):
    """A unary handler that answers its request once `release` is set; `running` holds
    [calls running now, the most at once]."""
    release = asyncio.Event()

    async def hold(request: bytes, context) -> bytes:
        running[0] += 1
        running[1] = max(running[1], running[0])
        try:
            await release.wait()
        finally:
            running[0] -= 1
        return request

    return unary(hold), release


async def test_a_client_keeps_to_the_servers_limit_of_open_calls(edge):
    """With `grpc.max_concurrent_streams` 4, twelve calls started at once on a connected
    channel (which has the server's SETTINGS) run four at a time: the rest wait in the
    client, and every one is answered."""
    if edge.kind != "http2":
        pytest.skip("gRPC core's server resets some of them (REFUSED_STREAM), which its "
                    "client reports as UNAVAILABLE")
    running = [0, 0]
    handler, release = holding(running)
    channel = await edge.connect({"Hold": handler, "Echo": unary(reverse)},
                                 options=[("grpc.max_concurrent_streams", 4), *SERVER_OPTIONS])
    assert await channel.unary_unary(method("Echo"))(b"ab", timeout=TIMEOUT_S) == b"ba"
    calls = [asyncio.ensure_future(channel.unary_unary(method("Hold"))(
        bytes([i]), timeout=TIMEOUT_S)) for i in range(12)]
    await until(lambda: running[0] == 4, TIMEOUT_S, "four calls running")
    release.set()
    assert [await call for call in calls] == [bytes([i]) for i in range(12)]
    assert running[1] == 4


async def test_a_stream_past_the_limit_is_refused_unprocessed(edge):
    """A client that opens more streams than the server's SETTINGS allow has the extra one
    reset with REFUSED_STREAM, before any handler sees it; the others are answered."""
    if edge.kind != "http2":
        pytest.skip("gRPC core does not reset such a stream at once")
    running = [0, 0]
    handler, release = holding(running)
    _, target = await edge.start({"Hold": handler},
                                 options=[("grpc.max_concurrent_streams", 2), *SERVER_OPTIONS])
    reader, writer = await raw_connection(edge, target)
    assert (await settled(reader, writer))[h2.MAX_CONCURRENT_STREAMS] == 2
    encoder = hpack.Encoder()
    for stream in (1, 3, 5):
        writer.write(h2.frame(h2.HEADERS, h2.END_HEADERS, stream, call_headers(encoder, "Hold"))
                     + h2.frame(h2.DATA, h2.END_STREAM, stream, h2.message(bytes([stream]))))
    await writer.drain()
    replies = Replies(reader)
    await replies.until(lambda: 5 in replies.resets)
    await until(lambda: running[0] == 2, TIMEOUT_S, "two calls running")
    release.set()
    await replies.until_ended(1, 3)
    writer.close()
    assert replies.resets == {5: h2.REFUSED_STREAM}
    assert {s: f["grpc-status"] for s, f in replies.trailers.items()} == {1: "0", 3: "0"}
    assert running[1] == 2


async def test_request_messages_that_never_finish_are_bounded(edge):
    """Bytes of request messages still arriving are held up to the server's limit: the call
    whose bytes pass it is answered RESOURCE_EXHAUSTED naming the limit, the others finish,
    and what an ended call held is let go."""
    if edge.kind != "http2":
        pytest.skip("the own server's limit")
    server, target = await edge.start({"Echo": unary(reverse)}, max_unfinished=MiB)
    reader, writer = await raw_connection(edge, target)
    await settled(reader, writer)
    encoder, message = hpack.Encoder(), h2.message(payload(900 << 10, 7))
    for stream in (1, 3):  # 576 KiB of a 900 KiB message each: 1,152 KiB in all
        writer.write(h2.frame(h2.HEADERS, h2.END_HEADERS, stream, call_headers(encoder, "Echo")))
        for start in range(0, 576 << 10, 16 << 10):
            writer.write(h2.frame(h2.DATA, 0, stream, message[start:start + (16 << 10)]))
    await writer.drain()
    replies = Replies(reader)
    await replies.until_ended(3)
    assert replies.trailers[3]["grpc-status"] == str(
        grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    assert "past its limit of 1048576" in unquote(replies.trailers[3]["grpc-message"])
    assert server.unfinished == 576 << 10  # stream 1's, still arriving
    for start in range(576 << 10, len(message), 16 << 10):
        end = h2.END_STREAM if start + (16 << 10) >= len(message) else 0
        writer.write(h2.frame(h2.DATA, end, 1, message[start:start + (16 << 10)]))
    await replies.until_ended(1)
    writer.close()
    assert replies.trailers[1]["grpc-status"] == "0"
    assert replies.data[1] == h2.message(payload(900 << 10, 7)[::-1])
    assert server.unfinished == 0


async def test_a_request_message_that_stops_arriving_is_given_up(edge):
    """A call whose request message gets no more bytes for the stall timeout is answered
    DEADLINE_EXCEEDED saying so, and its bytes are let go; one whose message keeps coming,
    slowly, is answered."""
    if edge.kind != "http2":
        pytest.skip("the own server's timeout")
    server, target = await edge.start({"Echo": unary(reverse)}, stall_timeout=1.0)
    reader, writer = await raw_connection(edge, target)
    await settled(reader, writer)
    encoder, message = hpack.Encoder(), h2.message(payload(32 << 10, 5))
    writer.write(h2.frame(h2.HEADERS, h2.END_HEADERS, 1, call_headers(encoder, "Echo"))
                 + h2.frame(h2.DATA, 0, 1, message[:16 << 10])
                 + h2.frame(h2.HEADERS, h2.END_HEADERS, 3, call_headers(encoder, "Echo")))

    async def trickle() -> None:  # stream 3's message, 4 KiB every 0.1 s
        for start in range(0, len(message), 4 << 10):
            end = h2.END_STREAM if start + (4 << 10) >= len(message) else 0
            writer.write(h2.frame(h2.DATA, end, 3, message[start:start + (4 << 10)]))
            await asyncio.sleep(0.1)

    trickling = asyncio.ensure_future(trickle())
    replies = Replies(reader)
    try:
        await replies.until_ended(1, 3)
    finally:
        trickling.cancel()
        writer.close()
    assert replies.trailers[1]["grpc-status"] == str(
        grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    assert unquote(replies.trailers[1]["grpc-message"]) == (
        "the request message stopped arriving (no bytes of it for 1 s)")
    assert replies.trailers[3]["grpc-status"] == "0"
    assert server.unfinished == 0


async def test_a_change_of_the_initial_window_moves_every_open_streams_window(edge):
    """An answer of 100 KiB to a client whose streams start with 16 KiB of window: 16 KiB
    leave; SETTINGS raising the initial window to 48 KiB let 32 KiB more leave on the open
    stream (RFC 9113, 6.9.2); a WINDOW_UPDATE lets the rest leave."""
    if edge.kind != "http2":
        pytest.skip("a client that writes its own frames")
    answer = payload(100 << 10, 9)

    async def big(request: bytes, context) -> bytes:
        return answer

    _, target = await edge.start({"Big": unary(big)})
    reader, writer = await raw_connection(edge, target)
    await settled(reader, writer, window=16 << 10)
    writer.write(h2.frame(h2.HEADERS, h2.END_HEADERS, 1, call_headers(hpack.Encoder(), "Big"))
                 + h2.frame(h2.DATA, h2.END_STREAM, 1, h2.message(b"x")))
    replies = Replies(reader)

    async def sent_before_a_ping(tag: bytes) -> int:
        """DATA received on stream 1 once the server answers a PING: all it could send
        before running out of window."""
        writer.write(h2.frame(h2.PING, 0, 0, tag))
        await replies.until(lambda: tag in replies.pongs)
        return len(replies.data.get(1, b""))

    # The answer's first DATA leaves in the same write as its headers, once the handler ran.
    await replies.until(lambda: 1 in replies.data)
    try:
        assert await sent_before_a_ping(b"window-1") == 16 << 10
        writer.write(h2.settings_frame({h2.INITIAL_WINDOW_SIZE: 48 << 10}))
        assert await sent_before_a_ping(b"window-2") == 48 << 10
        writer.write(h2.window_update(1, MiB))
        await replies.until_ended(1)
    finally:
        writer.close()
    assert replies.data[1] == h2.message(answer)


async def test_a_client_that_reads_nothing_cannot_pile_up_answers(edge):
    """A client that floods PINGs and reads none of their answers stops being read once the
    answers waiting for it pass the transport's high-water mark: the server holds a bounded
    amount for it, not all it was sent, and serves other clients meanwhile."""
    if edge.kind != "http2":
        pytest.skip("reads the own server's connections")
    server, target = await edge.start({"Echo": unary(reverse)})
    reader, writer = await raw_connection(edge, target, receive_buffer=64 << 10)
    writer.write(h2.PREFACE + h2.settings_frame({}))
    pings = h2.frame(h2.PING, 0, 0, bytes(8)) * 4096  # 68 KiB
    sent = 0

    async def flood() -> None:
        nonlocal sent
        for _ in range(512):  # 34 MiB
            writer.write(pings)
            await writer.drain()
            sent += len(pings)

    flooding = asyncio.ensure_future(flood())
    try:
        await until(lambda: server.connections, TIMEOUT_S, "the connection")
        [connection] = server.connections
        transport = connection._transport
        await until(lambda: not transport.is_reading(), 30, "the server stops reading")
        assert transport.get_write_buffer_size() < 2 * MiB
        assert await edge.channel(target).unary_unary(method("Echo"))(
            b"ab", timeout=TIMEOUT_S) == b"ba"
        assert not flooding.done() and sent < 32 * MiB, sent
        assert transport.get_write_buffer_size() < 2 * MiB
    finally:
        flooding.cancel()
        writer.close()


async def test_a_handler_that_reads_slowly_holds_its_client_back(edge):
    """A client streaming to a handler that does not read is held back by the stream's
    window: the server keeps at most a few windows of unread messages, not all it is sent."""
    release, reads = asyncio.Event(), []

    async def handler(requests, context):
        await release.wait()
        async for message in requests:
            reads.append(len(message))
        return b"done"

    channel = await edge.connect({"Slow": grpc.stream_unary_rpc_method_handler(handler)})
    call = channel.stream_unary(method("Slow"))(timeout=60)
    chunk, sent = payload(MiB, 3), 0

    async def send() -> None:
        nonlocal sent
        for _ in range(64):
            await call.write(chunk)
            sent += 1
        await call.done_writing()

    sender = asyncio.ensure_future(send())
    # 64 MiB cannot all leave while nothing is read: the sender is still held a second later
    # (with every byte acknowledged on arrival, all 64 leave in well under that).
    done, _ = await asyncio.wait({sender}, timeout=1.0)
    assert not done and sent < 48, sent
    release.set()
    await asyncio.wait_for(sender, 30)
    assert await call == b"done"
    assert reads == [MiB] * 64
