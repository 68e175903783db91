"""The services' own gRPC server (`Http2Server`) holds a bounded amount for a client that
streams faster than the handler reads: the whole messages a handler has not read yet count
with the request bytes still arriving (the call whose bytes pass the limit is answered
RESOURCE_EXHAUSTED, and an ended call's unread messages are let go), and a client that sends
past the window the server gave it loses its connection (FLOW_CONTROL_ERROR) instead of being
buffered. Loopback port 0, mutual TLS (the dev CA), clients that write HTTP/2 frames."""

import asyncio
from urllib.parse import unquote

import grpc
import hpack

from meshserve.common import http2_frames as h2
from meshserve.common.http2_connection import STREAM_WINDOW
from tests.integration.edge_servers import MiB, payload
from tests.integration.test_http2_server import (
    Replies,
    call_headers,
    raw_connection,
    read_frame,
    settled,
)
from tests.polling import until

TIMEOUT_S = 10
RESOURCE_EXHAUSTED = str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])


def messages(count: int, size: int, seed: int) -> bytes:
    return b"".join(h2.message(payload(size, seed + i)) for i in range(count))


def data_frames(stream: int, data: bytes, end: bool = False) -> bytes:
    chunk = 16 << 10
    return b"".join(
        h2.frame(h2.DATA, h2.END_STREAM if end and start + chunk >= len(data) else 0, stream,
                 data[start:start + chunk])
        for start in range(0, len(data), chunk))


async def test_messages_a_streaming_handler_has_not_read_are_bounded(own):
    """Two streams to a handler that reads nothing: 768 KiB of whole messages each, within
    each stream's window, 1.5 MiB in all past a limit of 1 MiB. The stream whose messages pass
    it is answered RESOURCE_EXHAUSTED naming the limit; once the other's handler ends, the
    server holds nothing."""
    release = asyncio.Event()

    async def unread(requests, context) -> bytes:
        await release.wait()
        return b"done"

    server, target = await own.start(
        {"Unread": grpc.stream_unary_rpc_method_handler(unread)}, max_unfinished=MiB)
    reader, writer = await raw_connection(own, target)
    await settled(reader, writer)
    encoder = hpack.Encoder()
    for stream in (1, 3):
        writer.write(h2.frame(h2.HEADERS, h2.END_HEADERS, stream,
                              call_headers(encoder, "Unread"))
                     + data_frames(stream, messages(12, 64 << 10, stream)))
    await writer.drain()
    replies = Replies(reader)
    try:
        await replies.until_ended(3)
        assert replies.trailers[3]["grpc-status"] == RESOURCE_EXHAUSTED
        assert "past its limit of 1048576" in unquote(replies.trailers[3]["grpc-message"])
        assert server.unfinished == 12 * (64 << 10)  # stream 1's, not read
        release.set()
        writer.write(h2.frame(h2.DATA, h2.END_STREAM, 1))
        await replies.until_ended(1)
        assert replies.trailers[1]["grpc-status"] == "0"
    finally:
        writer.close()
    await until(lambda: server.unfinished == 0, TIMEOUT_S, "the unread messages let go")


async def test_data_past_a_streams_window_closes_the_connection(own):
    """A client that ignores the window the server gave its stream (and goes on sending while
    the handler reads nothing) gets GOAWAY FLOW_CONTROL_ERROR, and what it sent is let go."""
    release = asyncio.Event()

    async def unread(requests, context) -> bytes:
        await release.wait()
        return b"done"

    server, target = await own.start(
        {"Unread": grpc.stream_unary_rpc_method_handler(unread)})
    reader, writer = await raw_connection(own, target)
    await settled(reader, writer)
    writer.write(h2.frame(h2.HEADERS, h2.END_HEADERS, 1,
                          call_headers(hpack.Encoder(), "Unread")))
    flood = data_frames(1, messages(1, 256 << 10, 1) * (2 * STREAM_WINDOW // (256 << 10)))
    writer.write(flood)
    try:
        while True:
            kind, _, _, frame = await read_frame(reader)
            if kind == h2.GOAWAY:
                break
        assert int.from_bytes(frame[4:8], "big") == h2.FLOW_CONTROL_ERROR
        assert b"past stream 1's window" in frame[8:]
    finally:
        release.set()
        writer.close()
    await until(lambda: server.unfinished == 0 and not server.connections, TIMEOUT_S,
                "the connection and its bytes let go")
