"""The services' own gRPC server leaves no garbage cycle behind a call its client reset
before the handler ran: the handler's task, cancelled before it began, keeps its
CancelledError, whose traceback holds the call; a call that still held that task made a cycle
that kept the call and its request until the garbage collector's next full pass (thousands
of them in an idle ingress after a storm of cancellations). Loopback port 0, mutual TLS, a
client that writes HTTP/2 frames: HEADERS, the request and RST_STREAM in one write."""

import asyncio
import gc

import grpc
import hpack

from meshserve.common import http2_frames as h2
from meshserve.common.http2_server import _Call
from tests.integration.test_http2_server import call_headers, raw_connection, settled
from tests.polling import until

CALLS = 50
CANCEL = 0x8  # RST_STREAM error code (RFC 9113 section 7)


async def test_a_call_reset_before_its_handler_ran_leaves_no_cycle(own):
    ran = []

    async def echo(request: bytes, context) -> bytes:
        ran.append(request)
        return request

    server, target = await own.start({"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    reader, writer = await raw_connection(own, target)
    await settled(reader, writer)
    encoder = hpack.Encoder()
    gc.collect()
    gc.disable()
    try:
        for index in range(CALLS):
            stream = 2 * index + 1
            writer.write(h2.frame(h2.HEADERS, h2.END_HEADERS, stream,
                                  call_headers(encoder, "Echo"))
                         + h2.frame(h2.DATA, h2.END_STREAM, stream, h2.message(b"x" * 1000))
                         + h2.rst_stream(stream, CANCEL))
        await writer.drain()
        # A last call answered: every frame before it has been read.
        last = 2 * CALLS + 1
        writer.write(h2.frame(h2.HEADERS, h2.END_HEADERS, last, call_headers(encoder, "Echo"))
                     + h2.frame(h2.DATA, h2.END_STREAM, last, h2.message(b"last")))
        await writer.drain()
        await until(lambda: b"last" in ran, 10, "the last call's handler")
        await asyncio.sleep(0)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        cycled = [o for o in gc.garbage if isinstance(o, _Call)]
        assert cycled == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        writer.close()
