"""A small HTTP/1.1 server for the ingress's event loop, on httptools (the llhttp parser).

Chosen by measurement (2 shared cores, uvloop, TLS, keep-alive, 32 connections, a 1.2 KiB
POST answered with a small JSON + binary body; server CPU per request, median of 5 runs):
aiohttp's web application ~175 µs, its low-level server ~165 µs, uvicorn with httptools
~125 µs (and it cannot show the application the client's certificate), this server ~55 µs;
a grpc.aio unary call doing the same ~375 µs.

Each connection parses requests as bytes arrive and answers them in order, one at a time
(pipelined requests wait their turn; reading pauses beyond `max_pipelined`). Keep-alive
follows HTTP/1.1 (`Connection: close`, HTTP/1.0). Refusals never buffer what a request
claims: a declared body over `max_body_bytes` is answered 413 as soon as its headers arrive
(and the connection closed), a chunked one the moment it grows past the limit; headers over
`max_header_bytes` get 431; a request whose bytes stop arriving for `read_timeout` seconds
gets 408 (a Content-Length larger than the body sent, say), and so does one whose headers
are not whole `header_timeout` seconds after its first byte, or whose body arrives slower
than `min_body_rate` on average (bytes dripped to hold a connection open); the body whose
bytes take the bodies the server holds unhandled (still arriving, or whole and waiting
behind pipelined requests) on all connections past `max_unfinished_bytes` gets 503 (so
clients that open many connections, or pipeline many bodies, cannot make the server hold the
body limit many times over); unparseable bytes get 400. Fields in a chunked body's trailer
are not merged into the headers (RFC 9110 §6.5.1). HEAD is answered as GET, without the
body. `Expect: 100-continue` is answered in its request's turn. The client's certificate
(TLS), if any, rides on each request as PEM.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import json
import logging
import ssl
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field

import httptools

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = 64 << 20
    max_header_bytes: int = 64 << 10
    read_timeout: float = 30.0  # a request in progress with no new bytes for this long: 408
    # A request's headers not whole this long after its first byte: 408 (bytes dripped slower
    # than `read_timeout` apart would otherwise hold the connection for ever).
    header_timeout: float = 30.0
    # A body arriving slower than this on average, once `read_timeout` has passed since its
    # headers: 408.
    min_body_rate: float = 1024.0  # bytes a second
    idle_timeout: float = 75.0  # a kept-alive connection with no request for this long: closed
    # Connections open at once; one past it is answered 503 and closed, so that open
    # connections cannot take every file descriptor the ingress (gRPC too) has.
    max_connections: int = 10_000
    max_pipelined: int = 16
    max_unfinished_bytes: int = 256 << 20  # bodies not yet handled, all connections together


@dataclass
class HttpRequest:
    method: str
    target: bytes  # as sent: path and query
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes = b""
    certificate: bytes | None = None  # the client's TLS certificate, PEM
    version: str = "1.1"  # HTTP's


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    # A body sent as it is made (Server-Sent Events): each piece an HTTP/1.1 chunk, the body
    # ended with the iterator (to an HTTP/1.0 client, the pieces and then the connection's
    # close). None: `body`, whole.
    stream: AsyncGenerator[bytes, None] | None = None


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


def plain_refusal(status: int, message: str) -> HttpResponse:
    """A refusal made before a request reaches the handler: `{"error": message}`."""
    return HttpResponse(status, json.dumps({"error": message}).encode())


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a connection's bytes."""


class _Date:
    """The `Date` header, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = email.utils.formatdate(now, usegmt=True).encode()
        return self._value


_REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}


def is_count(text: str) -> bool:
    """Whether `text` is a non-negative integer in ASCII digits ("²" is a digit to
    `str.isdigit`, not to `int`)."""
    return text.isascii() and text.isdigit()


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# After a refusal, how long the connection stays open for the client to read it, reading and
# dropping what the client still sends (see `_Connection._close_after_refusal`).
LINGER_S = 5.0


def response_head(response: HttpResponse, keep_alive: bool, date: bytes,
                  announce_keep_alive: bool = False) -> bytes:
    """The status line and headers; `announce_keep_alive` for an HTTP/1.0 request kept open,
    whose client otherwise takes the connection as closing."""
    lines = [b"HTTP/1.1 %d %s" % (response.status, _REASONS.get(response.status, b"")),
             b"date: " + date,
             b"content-type: " + response.content_type.encode(),
             b"content-length: %d" % len(response.body) if response.stream is None else
             b"transfer-encoding: chunked" if keep_alive else b"cache-control: no-cache"]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in response.headers]
    if not keep_alive:
        lines.append(b"connection: close")
    elif announce_keep_alive:
        lines.append(b"connection: keep-alive")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def slow_request(limits: HttpLimits, quiet: float, elapsed: float, headers_done: bool,
                 body_bytes: int) -> str | None:
    """Why a request in progress is given up (answered 408), or None: no bytes for
    `read_timeout` (`quiet` seconds since its last), its headers not whole `header_timeout`
    after its first byte, or its body arriving below `min_body_rate` on average once
    `read_timeout` has passed since its headers (`elapsed`: since its first byte, or since
    its headers once they are whole)."""
    if quiet >= limits.read_timeout:
        return f"no bytes for {limits.read_timeout:g} s"
    if not headers_done:
        if elapsed >= limits.header_timeout:
            return f"its headers were not whole within {limits.header_timeout:g} s"
        return None
    if elapsed >= limits.read_timeout and body_bytes < limits.min_body_rate * elapsed:
        return (f"its body came at {body_bytes / elapsed:.0f} bytes/s, below the minimum "
                f"of {limits.min_body_rate:g}")
    return None


def next_check(limits: HttpLimits, quiet: float, elapsed: float, headers_done: bool) -> float:
    """Seconds until `slow_request` could next find a reason (at least a tenth of one)."""
    waits = [limits.read_timeout - quiet]
    if not headers_done:
        waits.append(limits.header_timeout - elapsed)
    else:
        waits.append(max(limits.read_timeout - elapsed, 1.0))
    return max(min(waits), 0.1)


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._limits = server.limits
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._certificate: bytes | None = None
        # Whole requests waiting their turn (their bodies still counted in the server's
        # `unfinished`), refusals, and interim `100 Continue`s, in the order they are answered.
        self._queue: deque[tuple[HttpRequest | HttpResponse | bytes, bool]] = deque()
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._writable: asyncio.Future | None = None
        self._refused = False
        self._linger = False  # refused in the middle of a request: the client may still send
        self._closed = False
        self._in_message = False
        self._last_data = 0.0
        self._began = 0.0  # when the request in progress began, then when its headers ended
        self._held = 0  # bytes of the body in progress, counted in the server's `unfinished`
        self._reset()

    def _reset(self) -> None:
        self._target = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._declared: int | None = None
        self._headers_done = False

    # --- the transport's callbacks

    def connection_made(self, transport) -> None:
        self._transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:
            self._certificate = ssl.DER_cert_to_PEM_cert(der).encode()
        self._server.connections.add(self)
        open_now, limit = len(self._server.connections), self._limits.max_connections
        if open_now > limit:
            self._refuse(503, f"the server has {open_now} connections open, past its limit of "
                              f"{limit}; connect again later")
            return
        self._idle()

    def connection_lost(self, error) -> None:
        self._closed = True
        self._let_go()
        while self._queue:
            self._release(self._queue.popleft()[0])
        self._parser = None  # it refers back to this connection: no cycle left to collect
        self._server.connections.discard(self)
        self._cancel_timer()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._last_data = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not supported; speak HTTP/1.1")
        except httptools.HttpParserCallbackError as error:
            if not isinstance(error.__context__, _Refused):
                raise
        except httptools.HttpParserError as error:
            self._refuse(400, f"malformed HTTP request: {error}")

    def pause_writing(self) -> None:
        self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # --- the parser's callbacks

    def on_message_begin(self) -> None:
        self._in_message = True
        self._began = self._loop.time()
        self._reset()
        self._cancel_timer()
        self._timer = self._loop.call_later(
            min(self._limits.read_timeout, self._limits.header_timeout), self._check_progress)

    def on_url(self, url: bytes) -> None:
        self._target += url
        self._count_header(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header(len(name) + len(value))
        if self._headers_done:
            return  # a chunked body's trailer: not merged into the headers (RFC 9110 §6.5.1)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else f"{previous}, {text}"

    def _count_header(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self._limits.max_header_bytes:
            self._refuse(431, f"request headers are over the limit of "
                              f"{self._limits.max_header_bytes} bytes")
            raise _Refused

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._began = self._loop.time()
        length = self._headers.get("content-length")
        if length is not None and is_count(length):
            self._declared = int(length)
            if self._declared > self._limits.max_body_bytes:
                self._refuse(413, f"request body of {self._declared} bytes is over the limit "
                                  f"of {self._limits.max_body_bytes} bytes")
                raise _Refused
        if self._headers.get("expect", "").lower() == "100-continue":
            if self._task is None:
                self._transport.write(CONTINUE)
            else:  # after the answers to the requests before it
                self._enqueue(CONTINUE, True)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body_bytes:
            self._refuse(413, f"request body is over the limit of "
                              f"{self._limits.max_body_bytes} bytes")
            raise _Refused
        self._held += len(body)
        server = self._server
        server.unfinished += len(body)
        if server.unfinished > self._limits.max_unfinished_bytes:
            self._refuse(503, f"the server holds {server.unfinished} bytes of request bodies "
                              f"still arriving or waiting their turn, past its limit of "
                              f"{self._limits.max_unfinished_bytes}; send again later")
            raise _Refused
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._held = 0  # the body stays counted in `unfinished` until its turn (`_release`)
        self._cancel_timer()
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        parser = self._parser
        request = HttpRequest(parser.get_method().decode(), self._target, self._headers,
                              body, self._certificate, parser.get_http_version())
        self._reset()
        self._enqueue(request, self._parser.should_keep_alive())

    def _let_go(self) -> None:
        """The body in progress will not be whole: it no longer counts."""
        self._server.unfinished -= self._held
        self._held = 0

    def _release(self, item: HttpRequest | HttpResponse | bytes) -> None:
        """A whole request's turn has come, or will not: its body no longer counts."""
        if isinstance(item, HttpRequest):
            self._server.unfinished -= len(item.body)

    # --- answering

    def _enqueue(self, item: HttpRequest | HttpResponse | bytes, keep_alive: bool) -> None:
        self._queue.append((item, keep_alive))
        if len(self._queue) > self._limits.max_pipelined and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        if self._task is None:
            self._task = self._loop.create_task(self._answer())

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` after the requests before it, then close (after a refusal made
        in the middle of a request, once the client has read it); parse nothing more."""
        self._refused = True
        self._linger = self._in_message
        self._in_message = False
        self._let_go()
        self._cancel_timer()
        with contextlib.suppress(RuntimeError):
            self._transport.pause_reading()
        self._enqueue(plain_refusal(status, message), False)

    async def _answer(self) -> None:
        try:
            while self._queue and not self._closed:
                item, keep_alive = self._queue.popleft()
                if isinstance(item, bytes):
                    self._transport.write(item)  # an interim response
                    continue
                self._release(item)
                response = item if isinstance(item, HttpResponse) else await self._handle(item)
                if self._closed:
                    return
                keep_alive = keep_alive and not self._server.closing
                request = item if isinstance(item, HttpRequest) else None
                old_client = request is not None and request.version == "1.0"
                if response.stream is not None and old_client:
                    keep_alive = False  # no chunks in HTTP/1.0: the close ends the body
                head = response_head(response, keep_alive, self._server.date(), old_client)
                if request is not None and request.method == "HEAD":
                    self._transport.write(head)
                elif response.stream is not None:
                    self._transport.write(head)
                    await self._send_stream(response.stream, chunked=keep_alive)
                    if self._closed:
                        return
                else:
                    self._transport.write(head + response.body)
                if not keep_alive:
                    if self._linger:
                        self._close_after_refusal()
                    else:
                        self._transport.close()
                    return
                if self._reading_paused and len(self._queue) <= self._limits.max_pipelined:
                    self._reading_paused = False
                    self._transport.resume_reading()
                if self._writable is not None:
                    await self._writable
        finally:
            self._task = None
        if not self._closed and not self._in_message:
            self._idle()

    async def _send_stream(self, pieces: AsyncGenerator[bytes, None], chunked: bool) -> None:
        """Each piece as it is made (as a chunk, when `chunked`), waiting while the client
        reads slower; stopped (the iterator closed) when the connection is."""
        try:
            async for piece in pieces:
                if self._closed:
                    return
                if piece:
                    self._transport.write(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked
                                          else piece)
                if self._writable is not None:
                    await self._writable
            if chunked and not self._closed:
                self._transport.write(b"0\r\n\r\n")
        finally:
            await pieces.aclose()

    async def _handle(self, request: HttpRequest) -> HttpResponse:
        try:
            return await self._server.handler(request)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 — the handler answers its own errors; a safety net
            log.exception("HTTP handler failed")
            return plain_refusal(500, "internal error")

    # --- timers

    def _close_after_refusal(self) -> None:
        """Close once the client has read a refusal made in the middle of its request: a
        socket closed with bytes unread (the rest of a refused body) resets the connection,
        and the client loses what it had not read yet, the refusal too. So what it still
        sends is read and dropped, the writing half is closed where the transport can (plain
        TCP), and the connection closes when the client closes its side, or after LINGER_S.
        (A connection refused before its first request, past the connection limit, closes at
        once: under a flood of connections none waits.)"""
        with contextlib.suppress(RuntimeError):
            self._transport.resume_reading()
        if self._transport.can_write_eof():
            self._transport.write_eof()
        self._cancel_timer()
        self._timer = self._loop.call_later(LINGER_S, self._transport.close)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle(self) -> None:
        self._cancel_timer()
        self._timer = self._loop.call_later(self._limits.idle_timeout, self._close_idle)

    def _close_idle(self) -> None:
        if self._task is None and not self._in_message and self._transport is not None:
            self._transport.close()

    def _check_progress(self) -> None:
        """408 for a request whose bytes stopped, whose headers took too long, or whose body
        comes too slowly (`slow_request`); else look again when one of them could be so."""
        now = self._loop.time()
        refusal = slow_request(self._limits, now - self._last_data, now - self._began,
                               self._headers_done, self._body_bytes)
        if refusal is None:
            self._timer = self._loop.call_later(
                next_check(self._limits, now - self._last_data, now - self._began,
                           self._headers_done), self._check_progress)
            return
        self._timer = None
        got = (f"; got {self._body_bytes} of {self._declared} body bytes"
               if self._declared is not None else "")
        self._refuse(408, f"request not received in full: {refusal}{got}")

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    @property
    def busy(self) -> bool:
        return self._task is not None


class HttpServer:
    """`await start()` binds `host:port` (port 0: any free) and returns the port;
    `await stop(grace)` stops accepting, lets answers in progress finish within `grace`,
    then closes every connection."""

    def __init__(self, handler: Handler, address: str, ssl_context: ssl.SSLContext | None,
                 limits: HttpLimits = HttpLimits()) -> None:
        self.handler = handler
        self.address = address
        self.limits = limits
        self.unfinished = 0  # bytes of request bodies not yet handled, all connections
        self.connections: set[_Connection] = set()
        self.closing = False
        self.date = _Date()
        self._ssl = ssl_context
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        host, _, port = self.address.rpartition(":")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host.strip("[]"), int(port), ssl=self._ssl,
            reuse_address=True)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self, grace: float) -> None:
        self.closing = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace
        for connection in list(self.connections):
            if not connection.busy:
                connection.close()
        while any(c.busy for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            connection.close()


