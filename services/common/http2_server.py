"""A gRPC server written on HTTP/2 directly, in place of `grpc.aio.server()`, for every service.

gRPC's own server cost most of a hop's CPU in Python. Measured side by side (2 shared cores,
mutual TLS, uvloop, a bare ModelInfer answered with constant bytes, `meshserve bench run` as
the client): `grpc.aio` 169-193 µs of server CPU per call at concurrency 32 and 275-301 µs at
concurrency 1; the same server on the `h2` library 130 µs; this one 25 µs and 82-86 µs. The
difference is gRPC's machinery around each call (a completion queue polled by
its own thread, an event-loop wake-up per finished operation, several objects and a task per
call), not HTTP/2 or TLS.

It takes the same handlers (`grpc.GenericRpcHandler`s) and gives them a context with the
`grpc.aio.ServicerContext` methods the services use (`abort` from any task ends the call, as
in gRPC). What it does: mutual TLS (ALPN h2, certificates re-read at the first handshake after
they change), unary and streaming calls, metadata (binary too), deadlines (`grpc-timeout`),
cancellation (RST_STREAM), flow control both ways, message limits (RESOURCE_EXHAUSTED), gzip
and deflate requests, GOAWAY and a graceful stop; and bounds for a client that misbehaves,
where gRPC core's server has its own: on the calls it may have open on a connection
(advertised in SETTINGS, refused beyond with REFUSED_STREAM), on the bytes of request
messages still arriving (a unary call's whole message too, until its stream ends; and for how
long one may stall) and on what waits for a client that does not read (PING answers, say: its
connection is not read meanwhile). An `admit` check, when given, decides on each call as its
headers arrive, before any of its request is read (internal servers refuse callers of other
identities there). Answers are never
compressed; server push and priorities are not used. Frames, and HPACK as written and read,
are in `meshserve.common.http2_frames`; what both ends of a connection do alike (flow control,
SETTINGS, PING) in `meshserve.common.http2_connection`, which the hops' own client
(`meshserve.common.http2_client`) shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import zlib
from collections.abc import Callable, Iterable
from typing import NamedTuple

import grpc

from meshserve.common import http2_frames as h2
from meshserve.common import tls
from meshserve.common.errors import retry_hint
from meshserve.common.http2_connection import (
    MAX_HEADER_LIST,
    ConnectionFailure,
    Http2Connection,
    Http2Stream,
    initial_frames,
)
from meshserve.common.tls import MAX_MESSAGE_BYTES, TlsFiles

log = logging.getLogger(__name__)

# The calls a client may have open at once on one connection (gRPC's option
# "grpc.max_concurrent_streams" sets another): a gRPC client waits beyond it, and a stream
# opened anyway is refused unprocessed (REFUSED_STREAM). As many as gRPC core let wait for a
# handler (SERVER_OPTIONS), so a burst of thousands on one channel still reaches the
# ingress, which refuses at once what it cannot queue, saying why.
MAX_STREAMS = 20_000
# Bytes of request messages still arriving (each call's message in the making, and a
# streaming call's whole messages its handler has not read yet) that the server holds across
# all its connections; the call whose bytes pass it is answered RESOURCE_EXHAUSTED. Without
# it, clients that open many calls and never finish their messages (no handler, and so no
# authentication, runs before a unary request is whole) could make it hold up to the message
# limit on every stream, and clients streaming to handlers that read slowly a window's worth
# of messages on every stream.
MAX_UNFINISHED = 256 << 20
# The retry hint of that refusal: about a message's round trip between the hops.
UNFINISHED_RETRY_AFTER_S = 0.05
# A call holding part of a request message that gets no more of it for this long is answered
# DEADLINE_EXCEEDED and its bytes let go, so a client cannot keep the bytes above held by
# stalling (as the ingress's HTTP server answers 408).
STALL_TIMEOUT = 30.0

# zlib's window bits for the encodings a request may use: gzip, and deflate as zlib's format.
_WBITS = {b"gzip": 31, b"deflate": 15}


def _code(status: grpc.StatusCode) -> int:
    return status.value[0]


def server_ssl_context(files: TlsFiles, require_client_cert: bool = True) -> ssl.SSLContext:
    """The TLS of a port of this server: ALPN h2, certificates reloaded when they change."""
    return tls.server_ssl_context(files, require_client_cert, "h2")


class _Status(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _CallDetails(NamedTuple):
    method: str
    invocation_metadata: tuple


# Decides, as a call's headers arrive and before any of its request is read, whether the
# caller may make it: (method, the call's context) -> None, or the (code, details) that
# refuses it (the caller-identity check of internal servers).
Admit = Callable[[str, "_Call"], "tuple[grpc.StatusCode, str] | None"]
# Told of a call that ended before its handler ran, its deadline passed or its client reset
# it: (method, the status it ended with). The server answers such a call itself, so no
# handler sees it to count it.
Unserved = Callable[[str, grpc.StatusCode], None]


def undecodable(error: Exception) -> str:
    """The details of a request message that does not parse as the method's message."""
    return f"request is not a valid protobuf message: {error}"


class Http2Server:
    """`grpc.aio.server()`'s interface, as the services use it."""

    def __init__(self, options: Iterable[tuple[str, object]] = (),
                 max_unfinished: int = MAX_UNFINISHED,
                 stall_timeout: float = STALL_TIMEOUT, admit: Admit | None = None,
                 unserved: Unserved | None = None) -> None:
        settings: dict[str, object] = {}
        for key, value in options:  # the first of a repeated key counts, as in gRPC
            settings.setdefault(key, value)
        self.max_receive = int(settings.get("grpc.max_receive_message_length", 4 << 20))
        self.max_send = int(settings.get("grpc.max_send_message_length", MAX_MESSAGE_BYTES))
        self.max_streams = int(settings.get("grpc.max_concurrent_streams", MAX_STREAMS))
        self.max_unfinished = max_unfinished
        # Bytes of requests still arriving, all connections: messages in the making, and the
        # message of a unary call whose stream has not ended yet.
        self.unfinished = 0
        self.admit = admit
        self.unserved = unserved
        self.stall_timeout = stall_timeout
        self._sweeper: asyncio.TimerHandle | None = None
        self._handlers: list[grpc.GenericRpcHandler] = []
        self._sockets: list[tuple[socket.socket, ssl.SSLContext]] = []
        self._listeners: list[asyncio.AbstractServer] = []
        self.connections: set[_Connection] = set()
        self.stopping = False
        self._quiet = asyncio.Event()  # set once stopping and no call is open
        self._terminated = asyncio.Event()

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        """The generated `add_*_to_server` adds the same handlers as a generic handler too."""

    def add_secure_port(self, address: str, context: ssl.SSLContext) -> int:
        """Bind `address` (host:port, [v6]:port; port 0: any free) now, listen once started;
        the bound port, or 0 when it cannot be bound (as gRPC answers)."""
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        v6 = ":" in host
        try:
            sock = socket.create_server(
                (host, int(port)), backlog=1024, family=socket.AF_INET6 if v6 else socket.AF_INET,
                dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6())
        except OSError as error:
            log.error("could not bind %s: %s", address, error)
            return 0
        self._sockets.append((sock, context))
        return sock.getsockname()[1]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sock, context in self._sockets:
            self._listeners.append(await loop.create_server(
                lambda: _Connection(self), sock=sock, ssl=context, ssl_handshake_timeout=20))
        self._sweep()

    def _sweep(self) -> None:
        """Every third of `stall_timeout`: give up on the request messages that stopped
        arriving."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for connection in list(self.connections):
            for call in list(connection.calls.values()):
                call.give_up_if_stalled(now, self.stall_timeout)
        self._sweeper = loop.call_later(self.stall_timeout / 3, self._sweep)

    def handler(self, method: str, metadata: tuple) -> grpc.RpcMethodHandler | None:
        details = _CallDetails(method, metadata)
        for generic in self._handlers:
            found = generic.service(details)
            if found is not None:
                return found
        return None

    def calls_changed(self) -> None:
        """A connection's last call ended: a stopping server may be done waiting."""
        if self.stopping and not any(connection.calls for connection in self.connections):
            self._quiet.set()

    async def stop(self, grace: float | None) -> None:
        """Stop accepting, let open calls finish within `grace` seconds, then cancel them."""
        if self.stopping:
            await self._terminated.wait()
            return
        self.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for listener in self._listeners:
            listener.close()
        for connection in list(self.connections):
            connection.go_away()
        self.calls_changed()
        if grace:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._quiet.wait(), grace)
        for connection in list(self.connections):
            connection.close()
        self._terminated.set()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._terminated.wait(), timeout)
        except TimeoutError:
            return True
        return False


class _Connection(Http2Connection):
    """One client connection: frames in, calls dispatched, frames out."""

    def __init__(self, server: Http2Server) -> None:
        super().__init__()
        self.server = server
        self._preface = False
        self._heads = h2.HeadDecoder(MAX_HEADER_LIST)
        self._last_stream = 0
        self._going_away = False
        self._peer: dict | None = None

    # --- transport -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.server.connections.add(self)
        transport.write(initial_frames(self.server.max_streams))
        if self.server.stopping:
            self.go_away()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        for call in list(self.calls.values()):
            call.reset()
        self.calls.clear()
        self.server.connections.discard(self)
        self.server.calls_changed()

    def pause_writing(self) -> None:
        """What we wrote piles up unread (a client sending PINGs or SETTINGS and reading no
        answer, say): read nothing more from it until that has left, so a client cannot make
        us hold more than the transport's high-water mark and what one read asks for."""
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _flush(self) -> None:
        super()._flush()
        if self._going_away and not self.calls:
            self.close()

    def close(self) -> None:
        for call in list(self.calls.values()):
            call.reset()
        self._write()
        if self._transport is not None:
            self._transport.close()

    def go_away(self) -> None:
        """No new calls on this connection; those open finish."""
        if not self._going_away:
            self._going_away = True
            self.out.append(h2.goaway(self._last_stream))
            self.schedule_flush()

    def peer(self) -> dict:
        """What the handshake told of the client, read once per connection."""
        if self._peer is None:
            self._peer = _peer_properties(self._transport)
        return self._peer

    # --- frames in -------------------------------------------------------------------------

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        if not self._preface:
            start = self._start
            if self._end - start < len(h2.PREFACE):
                return
            if self._buffer[start:start + len(h2.PREFACE)] != h2.PREFACE:
                self._fail(h2.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                return
            self._preface = True
            self._start = start + len(h2.PREFACE)
        self._frames_in()

    def _fail(self, code: int, message: str) -> None:
        log.warning("closing an HTTP/2 connection: %s", message)
        self.out.append(h2.goaway(self._last_stream, code, message.encode()[:200]))
        self.close()

    def _check_headers(self, stream: int) -> None:
        if stream == 0 or stream % 2 == 0:
            raise ConnectionFailure(h2.PROTOCOL_ERROR, f"HEADERS on stream {stream}")

    def _reset(self, stream: int, code: int) -> None:
        call = self.calls.pop(stream, None)
        if call is not None:
            call.reset()
            self.server.calls_changed()

    def _headers(self, stream: int, flags: int, block: bytes) -> None:
        call = self.calls.get(stream)
        if call is not None:  # trailers: a client's stream ends with them
            self._heads.fields(block)
            if flags & h2.END_STREAM:
                call.received(b"", True)
            return
        head = self._heads.head(block)
        if stream <= self._last_stream:
            raise ConnectionFailure(h2.PROTOCOL_ERROR, f"stream {stream} reused")
        self._last_stream = stream
        if self._going_away or len(self.calls) >= self.server.max_streams:
            self.out.append(h2.rst_stream(stream, h2.REFUSED_STREAM))
            return
        call = _Call(self, stream, head)
        self.calls[stream] = call
        call.begin(head)
        if flags & h2.END_STREAM and not call.finished:
            call.received(b"", True)

    def _no_calls(self) -> None:
        self.server.calls_changed()


def _peer_properties(transport: asyncio.Transport | None) -> dict:
    """gRPC's auth context of a TLS peer: its certificate and the names in it."""
    properties: dict = {"transport_security_type": [b"ssl"],
                        "security_level": [b"TSI_PRIVACY_AND_INTEGRITY"]}
    address = None if transport is None else transport.get_extra_info("peername")
    if address:
        host, port = address[:2]
        properties["peer"] = f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
    ssl_object = None if transport is None else transport.get_extra_info("ssl_object")
    der = None if ssl_object is None else ssl_object.getpeercert(binary_form=True)
    if der is None:
        return properties
    certificate = ssl_object.getpeercert() or {}
    names = [value.encode() for _, value in certificate.get("subjectAltName", ())]
    common = [value.encode() for rdn in certificate.get("subject", ())
              for key, value in rdn if key == "commonName"]
    properties["x509_pem_cert"] = [ssl.DER_cert_to_PEM_cert(der).encode()]
    if common:
        properties["x509_common_name"] = common
    if names:
        properties["x509_subject_alternative_name"] = names
    return properties


class _Call(Http2Stream):
    """One stream: its requests as they arrive, its handler's task, and the context that
    handler is given (the `grpc.aio.ServicerContext` methods)."""

    def __init__(self, connection: _Connection, stream: int, head: h2.RequestHead) -> None:
        super().__init__(connection, stream)
        self._path = head.path
        self._encoding = head.encoding
        self._metadata = head.metadata
        self._deadline = (None if head.timeout is None
                          else connection.loop.time() + head.timeout)
        self._closing: bytes | None = None
        self._headers_sent = False
        self._initial: tuple = ()
        self._handler: grpc.RpcMethodHandler | None = None
        self._task: asyncio.Task | None = None  # the handler's, until it is done
        self._started = False  # the handler's task was made
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False
        self._reset = False
        self._began = False  # the handler's task has started running
        self._fed = 0.0  # when bytes of an unfinished request message last came
        self._held = 0  # bytes of a unary call's message, held until its stream ends
        self._unread = 0  # bytes of a streaming call's whole messages its handler has not read
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: tuple = ()

    # --- requests in -----------------------------------------------------------------------

    def begin(self, head: h2.RequestHead) -> None:
        """The call's headers are in: refuse a caller the server does not admit, and a call
        it cannot serve, before any of its request is read; else wait for the request (a
        streaming one's handler starts now)."""
        server = self.connection.server
        refusal = None if server.admit is None else server.admit(self._path, self)
        if refusal is not None:
            self._finish_now(*refusal)
            return
        if head.malformed:
            self._finish_now(grpc.StatusCode.INTERNAL, head.malformed)
            return
        handler = server.handler(self._path, self._metadata)
        if handler is None:
            self._finish_now(grpc.StatusCode.UNIMPLEMENTED,
                             f"unknown method {self._path}" if self._path else
                             "unknown method: the request has no :path")
            return
        self._handler = handler
        if self._deadline is not None:
            self._timer = self.connection.loop.call_at(self._deadline, self._expire)
        if handler.request_streaming:
            self._start()

    def received(self, data: bytes | memoryview, end: bool) -> None:
        if self.finished or self.half_closed:
            return
        if data:
            try:
                self._split(data)
            except _Status as status:
                self._finish_now(status.code, status.details)
                return
        if end:
            self.half_closed = True
        self._wake()
        if end and not self._started and self._handler is not None:
            self._start()

    def _split(self, data: bytes | memoryview) -> None:
        server = self.connection.server
        before = len(self._partial)
        try:
            messages = self._messages_in(data, server.max_receive)
        except ValueError as error:
            raise _Status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)) from None
        finally:
            server.unfinished += len(self._partial) - before
        if self._partial or messages:
            self._fed = self.connection.loop.time()
        for compressed, payload in messages:
            self._arrive(self._decompressed(payload) if compressed else payload)
        if server.unfinished > server.max_unfinished:
            raise _Status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the server holds {server.unfinished} bytes of request messages "
                          f"still arriving or not yet read, past its limit of "
                          f"{server.max_unfinished}; {retry_hint(UNFINISHED_RETRY_AFTER_S)}")

    def _arrive(self, message: bytes) -> None:
        """A whole request message. A unary call's is held, and counted with the bytes still
        arriving, until its stream ends and its handler takes it: no handler, and so no
        check of what it holds, runs before then."""
        if not self._handler.request_streaming:
            if self._messages:
                raise _Status(grpc.StatusCode.INTERNAL,
                              "a unary call needs one request message, got more")
            self._held = len(message)
            self.connection.server.unfinished += self._held
        else:
            self._unread += len(message)
            self.connection.server.unfinished += len(message)
        super()._arrive(message)

    async def _next_message(self) -> bytes | None:
        """The next whole message of a streaming call, no longer counted once its handler
        has it."""
        message = await super()._next_message()
        if message is not None and self._unread:
            self._unread -= len(message)
            self.connection.server.unfinished -= len(message)
        return message

    def _decompressed(self, payload: bytes) -> bytes:
        """A compressed message, inflated no further than the size limit allows."""
        limit = self.connection.server.max_receive
        wbits = _WBITS.get(self._encoding)
        if wbits is None:
            raise _Status(grpc.StatusCode.UNIMPLEMENTED, "Compression algorithm "
                          f"'{self._encoding.decode('latin-1')}' is disabled")
        inflate = zlib.decompressobj(wbits)
        try:
            data = inflate.decompress(payload, limit + 1)
        except zlib.error as error:
            raise _Status(grpc.StatusCode.INTERNAL, f"could not decompress: {error}") from None
        if len(data) > limit or inflate.unconsumed_tail:
            raise _Status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"Received message larger than max (over {limit} bytes inflated)")
        return data

    async def _requests(self, decode):
        while (message := await self._next_message()) is not None:
            yield message if decode is None else self._decoded(decode, message)

    def _decoded(self, decode, message: bytes):
        """A streamed request message parsed; one that does not parse ends the call
        INVALID_ARGUMENT saying so (and whatever reads the stream with it: a handler may read
        its requests from a task of its own, which would otherwise fail unseen)."""
        try:
            return decode(message)
        except Exception as error:  # noqa: BLE001 — the parser's, answered to the caller
            self._finish_now(grpc.StatusCode.INVALID_ARGUMENT, undecodable(error))
            raise asyncio.CancelledError() from None

    # --- the handler -----------------------------------------------------------------------

    def _start(self) -> None:
        self._started = True
        self._task = self.connection.loop.create_task(self._serve(self._handler))
        self._task.add_done_callback(self._served)

    def _served(self, task: asyncio.Task) -> None:
        """Forget the handler's finished task: a task cancelled before it ran keeps its
        CancelledError, whose traceback holds `_serve`'s frame and so this call, a cycle that
        would keep the call and its request until the garbage collector's next full pass."""
        self._task = None

    async def _serve(self, handler: grpc.RpcMethodHandler) -> None:
        self._began = True
        try:
            if handler.request_streaming:
                request = self._requests(handler.request_deserializer)
            else:
                request = self._single_request(handler.request_deserializer)
            if handler.response_streaming:
                behavior = handler.stream_stream or handler.unary_stream
                answers = behavior(request, self)
                if hasattr(answers, "__aiter__"):
                    async for answer in answers:
                        await self.write(answer)
                else:
                    await answers
            else:
                behavior = handler.unary_unary or handler.stream_unary
                answer = await behavior(request, self)
                if answer is not None:
                    self._send_message(answer)
            self._finish(self.code or grpc.StatusCode.OK, self.details)
        except grpc.aio.AbortError:
            self._finish(self.code or grpc.StatusCode.UNKNOWN, self.details)
        except _Status as status:
            self._finish(status.code, status.details)
        except asyncio.CancelledError:
            if self._expired:
                self._finish(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            elif not self._reset:
                self._finish(grpc.StatusCode.UNAVAILABLE, "the server is stopping")
        except Exception as error:  # noqa: BLE001 — the caller gets a status, as from gRPC
            log.exception("a handler of %s failed", self._path)
            self._finish(grpc.StatusCode.UNKNOWN, f"Unexpected {type(error)}: {error}")

    def _single_request(self, decode):
        if self._partial:
            raise _Status(grpc.StatusCode.INTERNAL, "the request message was cut short: its "
                          f"stream ended after {len(self._partial)} bytes of it")
        if len(self._messages) != 1:
            raise _Status(grpc.StatusCode.INTERNAL,
                          f"a unary call needs one request message, got {len(self._messages)}")
        self._let_go()
        message = self._messages.popleft()
        return message if decode is None else decode(message)

    def give_up_if_stalled(self, now: float, stall_timeout: float) -> None:
        if self.finished or now - self._fed <= stall_timeout:
            return
        if self._partial:
            self._finish_now(grpc.StatusCode.DEADLINE_EXCEEDED, "the request message stopped "
                             f"arriving (no bytes of it for {stall_timeout:g} s)")
        elif self._held:
            self._finish_now(grpc.StatusCode.DEADLINE_EXCEEDED, "the request did not end: "
                             f"its stream stayed open {stall_timeout:g} s after its message")

    def _expire(self) -> None:
        """The deadline passed: the handler is cancelled and the call ends DEADLINE_EXCEEDED
        (a handler that has not run yet is never started, and the call is answered here)."""
        self._expired = True
        if self._task is not None and not self._task.done() and self._began:
            self._task.cancel()
        elif not self.finished:
            self._unserved(grpc.StatusCode.DEADLINE_EXCEEDED)
            self._finish_now(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def reset(self) -> None:
        """The client reset the stream, or the connection is gone: no answer will be read."""
        if not self.finished:
            self._unserved(grpc.StatusCode.CANCELLED)
        self._reset = True
        self.finished = True
        self._drop_queued()
        self.connection.blocked.pop(self.stream, None)
        self._end()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _unserved(self, code: grpc.StatusCode) -> None:
        """Tell the server's `unserved` of a call it admitted that ends, `code`, before its
        handler ran."""
        unserved = self.connection.server.unserved
        if unserved is not None and not self._began and self._handler is not None:
            unserved(self._path, code)

    # --- answers out -----------------------------------------------------------------------

    def _send_message(self, answer) -> None:
        serialize = self._handler.response_serializer
        payload = answer if serialize is None else serialize(answer)
        if len(payload) > self.connection.server.max_send:
            raise _Status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"Sent message larger than max ({len(payload)} vs. "
                          f"{self.connection.server.max_send})")
        self._open()
        self._queue(payload, len(payload))
        self.push()

    def _open(self) -> None:
        if not self._headers_sent:
            self._headers_sent = True
            self.connection.header_frames(self.stream, h2.response_headers(self._initial),
                                          False)

    def push(self) -> None:
        """Send what the windows allow; the trailers once everything before them is sent."""
        if not self._send_queued():
            return
        connection = self.connection
        if self._closing is not None:
            connection.header_frames(self.stream, self._closing, True)
            self._closing = None
            self._end()
            if not self.half_closed:  # we answered before the client finished sending
                connection.out.append(h2.rst_stream(self.stream, h2.NO_ERROR))
            connection.closed(self)
        else:
            connection.schedule_flush()

    def _finish(self, code: grpc.StatusCode, details: str) -> None:
        if self.finished:
            return
        self.finished = True
        self._let_go()
        block = h2.trailers(_code(code), details, self.trailing)
        if not self._headers_sent:  # trailers only
            self._headers_sent = True
            block = h2.response_headers(self._initial) + block
        self._closing = block
        self.push()

    def _finish_now(self, code: grpc.StatusCode, details: str) -> None:
        """An answer before any handler ran, or instead of it."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._drop_queued()
        self._finish(code, details)

    def _end(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._let_go()
        self._wake()
        self._release()

    def _let_go(self) -> None:
        """The call reads no more (the message it was receiving will not be finished, and
        the whole ones its handler had not read will not be read), or its handler has taken
        its unary request: none of them counts as still arriving."""
        if self._partial:
            self.connection.server.unfinished -= len(self._partial)
            self._partial.clear()
        if self._held:
            self.connection.server.unfinished -= self._held
            self._held = 0
        if self._unread:  # a streaming call's messages its handler will not read
            self.connection.server.unfinished -= self._unread
            self._unread = 0
            self._messages.clear()
            self.unread = 0

    # --- grpc.aio.ServicerContext ------------------------------------------------------------

    async def read(self):
        message = await self._next_message()
        if message is None:
            return grpc.aio.EOF
        decode = self._handler.request_deserializer
        return message if decode is None else self._decoded(decode, message)

    async def write(self, message) -> None:
        if self.finished:
            raise asyncio.CancelledError()
        self._send_message(message)
        await self._wait_for_room()

    async def send_initial_metadata(self, metadata) -> None:
        self._initial = tuple(metadata)
        self._open()

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata=()) -> None:
        """End the call now with `code`, from the handler or any task it started (then the
        handler is cancelled), as in gRPC."""
        if not self.finished:
            self.code = code
            self.details = details
            if trailing_metadata:
                self.trailing = tuple(trailing_metadata)
            self._finish(code, details)
            if self._task is not None and self._task is not asyncio.current_task():
                self._task.cancel()
        raise grpc.aio.AbortError()

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = tuple(metadata)

    def invocation_metadata(self) -> tuple:
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - self.connection.loop.time())

    def cancelled(self) -> bool:
        return self._reset or self._expired

    def done(self) -> bool:
        return self.finished

    def peer(self) -> str:
        return self.connection.peer().get("peer", "")

    def auth_context(self) -> dict:
        return {key: value for key, value in self.connection.peer().items() if key != "peer"}

    def peer_identity_key(self) -> str | None:
        properties = self.connection.peer()
        for key in ("x509_subject_alternative_name", "x509_common_name"):
            if key in properties:
                return key
        return None

    def peer_identities(self) -> list[bytes] | None:
        key = self.peer_identity_key()
        return None if key is None else self.connection.peer()[key]

    def set_compression(self, compression) -> None:
        """Answers are sent uncompressed."""

    def disable_next_message_compression(self) -> None:
        """Answers are sent uncompressed."""
