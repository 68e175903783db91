"""The ingress's HTTP/1.1 layer (`HttpServer`) keeps at most `max_connections` open: one
more is answered 503 naming the limit and closed, and once a connection closes a new one is
served. On a real socket."""

import asyncio
import contextlib

from meshserve.ingress.http_server import HttpLimits, HttpRequest, HttpResponse, HttpServer
from tests.polling import until

GET = b"GET /v2 HTTP/1.1\r\nhost: x\r\n\r\n"


async def ok(request: HttpRequest) -> HttpResponse:
    return HttpResponse(200, b"{}")


async def answer_to(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """The head of the answer to a GET, its body (`{}`) read too."""
    writer.write(GET)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    await asyncio.wait_for(reader.readexactly(2), 10)
    return head


async def test_a_connection_past_the_limit_is_answered_503_and_closed():
    server = HttpServer(ok, "127.0.0.1:0", None, HttpLimits(max_connections=2))
    port = await server.start()
    opened = []
    try:
        for _ in range(2):
            opened.append(await asyncio.open_connection("127.0.0.1", port))
            assert (await answer_to(*opened[-1])).startswith(b"HTTP/1.1 200")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        refused = await asyncio.wait_for(reader.read(), 10)  # the server closes it
        writer.close()
        assert refused.startswith(b"HTTP/1.1 503")
        assert (b"the server has 3 connections open, past its limit of 2; connect again "
                b"later") in refused
        assert (await answer_to(*opened[0])).startswith(b"HTTP/1.1 200")  # still served
        opened.pop()[1].close()
        await until(lambda: len(server.connections) == 1, 10, "a connection closed")
        opened.append(await asyncio.open_connection("127.0.0.1", port))
        assert (await answer_to(*opened[-1])).startswith(b"HTTP/1.1 200")
    finally:
        for _, writer in opened:
            with contextlib.suppress(Exception):
                writer.close()
        await server.stop(0.5)
