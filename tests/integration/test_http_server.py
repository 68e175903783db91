"""The ingress's HTTP/1.1 layer (`HttpServer`) on a real socket, with a handler the test
holds back: what pipelined requests keep counted while they wait their turn, and the parts of
HTTP/1.1 a proxy or a client library relies on (trailers, HEAD, `100 Continue`, HTTP/1.0
keep-alive), and bodies streamed as they are made."""

import asyncio
import json

import pytest

from meshserve.ingress.http_server import HttpLimits, HttpRequest, HttpResponse, HttpServer

MAX_UNFINISHED = 1 << 20
BODY = 400 << 10


class Handler:
    """Answers each request with its method, target and headers as JSON; a request whose
    target is /slow waits until `go` is set."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.seen: list[HttpRequest] = []
        self.streamed: list[str] = []  # what /events sent, then "closed"

    async def events(self):
        """/events: two pieces, then one more once `go` is set."""
        try:
            for piece in ("data: 1\n\n", "data: 2\n\n"):
                self.streamed.append(piece)
                yield piece.encode()
            await self.go.wait()
            self.streamed.append("data: 3\n\n")
            yield b"data: 3\n\n"
        finally:
            self.streamed.append("closed")

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        self.seen.append(request)
        if request.target == b"/slow":
            await self.go.wait()
        if request.target == b"/events":
            return HttpResponse(200, content_type="text/event-stream", stream=self.events())
        return HttpResponse(200, json.dumps({"method": request.method,
                                             "target": request.target.decode(),
                                             "headers": request.headers}).encode())


@pytest.fixture
async def served():
    handler = Handler()
    server = HttpServer(handler, "127.0.0.1:0", None,
                        HttpLimits(max_unfinished_bytes=MAX_UNFINISHED, read_timeout=5))
    port = await server.start()
    try:
        yield server, handler, port
    finally:
        handler.go.set()
        await server.stop(0.5)


async def read_answer(reader: asyncio.StreamReader, body: bool = True):
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if line)
    length = int(headers.get("content-length", 0))
    content = await asyncio.wait_for(reader.readexactly(length), 10) if body else b""
    return int(lines[0].split()[1]), headers, content


def post(target: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n%s\r\n"
            % (target.encode(), len(body), extra)) + body


async def wait_for(condition, seconds: float = 10) -> None:
    for _ in range(int(seconds * 100)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def test_whole_bodies_waiting_their_turn_count_against_the_servers_limit(served):
    """Behind a request the handler holds, a client pipelines whole 400 KiB bodies: they stay
    counted until their turn, so the third (1.2 MiB in all) is refused 503 naming the limit,
    after the answers to the requests before it; once all are answered nothing is counted."""
    server, handler, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(post("/slow", b"{}") + b"".join(post(f"/{i}", b" " * BODY)
                                                     for i in range(3)))
        await writer.drain()
        await wait_for(lambda: server.unfinished == 2 * BODY and len(handler.seen) == 1)
        handler.go.set()
        answers = [await read_answer(reader) for _ in range(4)]
        assert [status for status, _, _ in answers] == [200, 200, 200, 503]
        assert answers[3][1]["connection"] == "close"
        error = json.loads(answers[3][2])["error"]
        assert error.startswith("the server holds ") and error.endswith(
            f"bytes of request bodies still arriving or waiting their turn, past its limit "
            f"of {MAX_UNFINISHED}; send again later"), error
        assert server.unfinished == 0
    finally:
        writer.close()


async def test_a_body_refused_while_it_arrives_gets_its_answer_then_the_close(served):
    """The server refuses a body that passes its limit while the client is still sending it:
    what the client sends after is read and dropped, so the client reads the whole refusal
    and then the end of the connection, not a reset that loses the answer."""
    server, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(post("/big", b" " * (8 * MAX_UNFINISHED)))
        answer = await asyncio.wait_for(reader.read(), 10)  # to the server's end
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b"past its limit of %d" % MAX_UNFINISHED in answer
        await wait_for(lambda: server.unfinished == 0)
    finally:
        writer.close()


async def test_a_connection_closed_with_bodies_waiting_releases_them(served):
    server, handler, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post("/slow", b"{}") + post("/1", b" " * BODY) + post("/2", b" " * BODY))
    await writer.drain()
    await wait_for(lambda: server.unfinished == 2 * BODY)
    writer.close()
    await wait_for(lambda: server.unfinished == 0 and not server.connections)
    assert [r.target for r in handler.seen] == [b"/slow"]


async def test_a_chunked_bodys_trailer_is_not_merged_into_the_headers(served):
    _, handler, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /t HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
                     b"x-seen: header\r\n\r\n2\r\n{}\r\n0\r\n"
                     b"authorization: Bearer smuggled\r\nx-model-version: 2\r\n\r\n")
        status, _, body = await read_answer(reader)
        assert status == 200
        headers = json.loads(body)["headers"]
        assert headers["x-seen"] == "header"
        assert "authorization" not in headers and "x-model-version" not in headers
        assert handler.seen[0].body == b"{}"
    finally:
        writer.close()


async def test_head_is_answered_without_a_body_and_the_connection_stays_in_step(served):
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"HEAD /a HTTP/1.1\r\nhost: x\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\n\r\n")
        status, headers, _ = await read_answer(reader, body=False)
        assert status == 200 and int(headers["content-length"]) > 0  # the GET's length
        status, _, body = await read_answer(reader)
        assert status == 200 and json.loads(body)["target"] == "/b"
    finally:
        writer.close()


async def test_100_continue_waits_for_the_answers_before_it(served):
    _, handler, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n"
                     b"POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n"
                     b"expect: 100-continue\r\n\r\n")
        await writer.drain()
        await wait_for(lambda: len(handler.seen) == 1)
        handler.go.set()
        status, _, body = await read_answer(reader)
        assert status == 200 and json.loads(body)["target"] == "/slow"
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"{}")
        status, _, body = await read_answer(reader)
        assert status == 200 and json.loads(body)["target"] == "/p"
    finally:
        writer.close()


async def test_http_1_0_keep_alive_is_announced(served):
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for target in ("/1", "/2"):
            writer.write(b"GET %s HTTP/1.0\r\nconnection: keep-alive\r\n\r\n" % target.encode())
            status, headers, body = await read_answer(reader)
            assert (status, headers["connection"]) == (200, "keep-alive")
            assert json.loads(body)["target"] == target
        writer.write(b"GET /3 HTTP/1.0\r\n\r\n")
        status, headers, _ = await read_answer(reader)
        assert (status, headers["connection"]) == (200, "close")
    finally:
        writer.close()



def chunk(piece: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(piece), piece)


async def test_a_streamed_body_goes_out_in_chunks_as_it_is_made(served):
    """HTTP/1.1: each piece a chunk as soon as it is made (two before the third is), the body
    ended by the last chunk, and the connection kept for the next request."""
    server, handler, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /events HTTP/1.1\r\nhost: x\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert b"transfer-encoding: chunked" in head and b"content-length" not in head
        first = chunk(b"data: 1\n\n") + chunk(b"data: 2\n\n")
        assert await asyncio.wait_for(reader.readexactly(len(first)), 10) == first
        handler.go.set()
        rest = chunk(b"data: 3\n\n") + b"0\r\n\r\n"
        assert await asyncio.wait_for(reader.readexactly(len(rest)), 10) == rest
        writer.write(b"GET /next HTTP/1.1\r\nhost: x\r\n\r\n")
        status, _, body = await read_answer(reader)
        assert (status, json.loads(body)["target"]) == (200, "/next")
    finally:
        writer.close()


async def test_a_streamed_body_to_http_1_0_ends_with_the_connection(served):
    server, handler, port = served
    handler.go.set()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /events HTTP/1.0\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # until the server closes
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"connection: close" in head and b"chunked" not in head
        assert body == b"data: 1\n\ndata: 2\n\ndata: 3\n\n"
    finally:
        writer.close()


async def test_a_client_that_leaves_mid_stream_closes_what_makes_it(served):
    """Closed at once, not at its next piece: a model's stream stops when its client leaves."""
    server, handler, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /events HTTP/1.1\r\nhost: x\r\n\r\n")
    await writer.drain()
    await wait_for(lambda: len(handler.streamed) == 2)
    writer.close()
    await wait_for(lambda: handler.streamed[-1] == "closed")
    assert handler.streamed == ["data: 1\n\n", "data: 2\n\n", "closed"]
