"""The ingress's HTTP/1.1 layer (`HttpServer`) gives up a request whose bytes are dripped to
hold a connection open, each sooner than `read_timeout` after the last: headers not whole
`header_timeout` after their first byte, and a body below `min_body_rate`, are answered 408
saying which, and the connection closed; a body at a fair rate is served. On a real socket,
with short limits."""

import asyncio
import json

import pytest

from meshserve.ingress.http_server import (
    HttpLimits,
    HttpRequest,
    HttpResponse,
    HttpServer,
    slow_request,
)

LIMITS = HttpLimits(read_timeout=1.0, header_timeout=1.0, min_body_rate=100.0)
DRIP_S = 0.2  # sooner than read_timeout: the bytes never stop


async def echo_length(request: HttpRequest) -> HttpResponse:
    return HttpResponse(200, json.dumps({"length": len(request.body)}).encode())


@pytest.fixture
async def port():
    server = HttpServer(echo_length, "127.0.0.1:0", None, LIMITS)
    bound = await server.start()
    try:
        yield bound
    finally:
        await server.stop(0.5)


async def dripped(port: int, head: bytes, drip: bytes, step: int = 1) -> tuple[bytes, int]:
    """Send `head`, then `drip` `step` bytes every DRIP_S until the server answers; (what it
    answered, the bytes of `drip` sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    sent = 0

    async def trickle() -> None:
        nonlocal sent
        for start in range(0, len(drip), step):
            writer.write(drip[start:start + step])
            sent = start + step
            await asyncio.sleep(DRIP_S)

    trickling = asyncio.ensure_future(trickle())
    try:
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        trickling.cancel()
        writer.close()
    return answer, sent


async def test_headers_dripped_past_the_header_timeout_are_answered_408(port):
    answer, sent = await dripped(port, b"GET /v2 HTTP/1.1\r\n", b"x-slow: " + b"a" * 100)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"its headers were not whole within 1 s" in answer
    assert sent < 20  # given up after about a second, not when the headers would end


async def test_a_body_dripped_below_the_minimum_rate_is_answered_408(port):
    head = b"POST /infer HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n"
    answer, sent = await dripped(port, head, b"a" * 1000)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"below the minimum of 100" in answer and b"of 1000 body bytes" in answer
    assert sent < 30


async def test_a_body_at_a_fair_rate_is_served(port):
    body = b"a" * 2000  # 100 bytes every DRIP_S: 500 bytes/s, over 4 s
    head = b"POST /infer HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 2000\r\n\r\n"
    answer, sent = await dripped(port, head, body, step=100)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"length": 2000}')
    assert sent == 2000


@pytest.mark.parametrize(("quiet", "elapsed", "headers_done", "body_bytes", "reason"), [
    (0.1, 0.5, False, 0, None),
    (1.0, 0.5, False, 0, "no bytes for 1 s"),
    (0.1, 1.0, False, 0, "its headers were not whole within 1 s"),
    (0.1, 0.9, True, 0, None),  # a body's first read_timeout is its grace
    (0.1, 2.0, True, 150, "its body came at 75 bytes/s, below the minimum of 100"),
    (0.1, 2.0, True, 200, None),
])
def test_why_a_request_in_progress_is_given_up(quiet, elapsed, headers_done, body_bytes,
                                               reason):
    assert slow_request(LIMITS, quiet, elapsed, headers_done, body_bytes) == reason
