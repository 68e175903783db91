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
and deflate requests, GOAWAY and a graceful stop. Answers are never compressed; server push
and priorities are not used. Frames, and HPACK as written and read, are in
`meshserve.common.http2_frames`. Clients stay grpcio's (the router's xDS needs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import zlib
from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

import grpc
import hpack

from meshserve.common import http2_frames as h2
from meshserve.common import tls
from meshserve.common.tls import MAX_MESSAGE_BYTES, TlsFiles

log = logging.getLogger(__name__)

# Our side of flow control: what a client may send ahead of our acknowledgements.
STREAM_WINDOW = 4 << 20
CONNECTION_WINDOW = 16 << 20
MAX_FRAME = 1 << 20  # the largest frame we accept (16 KiB is HTTP/2's least)
MAX_HEADER_LIST = 64 << 10
# A streaming answer's writer waits while this much of it waits for the client's window.
WRITE_BACKLOG = 1 << 20
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


class _ConnectionError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _CallDetails(NamedTuple):
    method: str
    invocation_metadata: tuple


class Http2Server:
    """`grpc.aio.server()`'s interface, as the services use it."""

    def __init__(self, options: Iterable[tuple[str, object]] = ()) -> None:
        settings: dict[str, object] = {}
        for key, value in options:  # the first of a repeated key counts, as in gRPC
            settings.setdefault(key, value)
        self.max_receive = int(settings.get("grpc.max_receive_message_length", 4 << 20))
        self.max_send = int(settings.get("grpc.max_send_message_length", MAX_MESSAGE_BYTES))
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


class _Connection(asyncio.Protocol):
    """One client connection: frames in, calls dispatched, frames out."""

    def __init__(self, server: Http2Server) -> None:
        self.server = server
        self.calls: dict[int, _Call] = {}
        self.peer_window = h2.DEFAULT_WINDOW  # each new stream's send window
        self.peer_frame = h2.DEFAULT_FRAME_SIZE
        self.send_window = h2.DEFAULT_WINDOW  # the connection's
        self.blocked: dict[int, _Call] = {}
        self._buffer = bytearray()
        self._preface = False
        self._heads = h2.HeadDecoder(MAX_HEADER_LIST)
        self._continued: tuple[int, int, bytearray] | None = None
        self._received = 0
        self._last_stream = 0
        self._going_away = False
        self.out: list[bytes] = []  # frames for the next write
        self._flush_pending = False
        self._transport: asyncio.Transport | None = None
        self._peer: dict | None = None
        self.loop = asyncio.get_running_loop()

    # --- transport -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.server.connections.add(self)
        transport.write(h2.settings_frame({
            h2.ENABLE_PUSH: 0, h2.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.MAX_FRAME_SIZE: MAX_FRAME, h2.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST})
            + h2.window_update(0, CONNECTION_WINDOW - h2.DEFAULT_WINDOW))
        if self.server.stopping:
            self.go_away()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        for call in list(self.calls.values()):
            call.reset()
        self.calls.clear()
        self.server.connections.discard(self)
        self.server.calls_changed()

    def schedule_flush(self) -> None:
        """Write what is waiting once this turn of the event loop is done (answers that
        finish in the same turn leave in one write)."""
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        self._write()
        if self._going_away and not self.calls:
            self.close()

    def _write(self) -> None:
        if self.out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(self.out))
        self.out.clear()

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

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        position = 0
        if not self._preface:
            if len(buffer) < len(h2.PREFACE):
                return
            if buffer[:len(h2.PREFACE)] != h2.PREFACE:
                self._fail(h2.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                return
            self._preface = True
            position = len(h2.PREFACE)
        end = len(buffer)
        unpack = h2.FRAME_HEADER.unpack_from
        try:
            while end - position >= 9:
                high, low, kind, flags, stream = unpack(buffer, position)
                size = high << 16 | low
                if size > MAX_FRAME:
                    raise _ConnectionError(h2.FRAME_SIZE_ERROR, f"a frame of {size} bytes")
                if end - position - 9 < size:
                    break
                payload = bytes(buffer[position + 9:position + 9 + size])
                position += 9 + size
                self._frame(kind, flags, stream & 0x7FFFFFFF, payload)
        except _ConnectionError as error:
            self._fail(error.code, str(error))
            return
        del buffer[:position]
        if self._received >= CONNECTION_WINDOW // 4:
            self.out.append(h2.window_update(0, self._received))
            self._received = 0
        self._flush()

    def _fail(self, code: int, message: str) -> None:
        log.warning("closing an HTTP/2 connection: %s", message)
        self.out.append(h2.goaway(self._last_stream, code, message.encode()[:200]))
        self.close()

    def _frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if self._continued is not None and kind != h2.CONTINUATION:
            raise _ConnectionError(h2.PROTOCOL_ERROR, "a header block was interrupted")
        if kind == h2.DATA:
            self._data(flags, stream, payload)
        elif kind == h2.HEADERS:
            if stream == 0 or stream % 2 == 0:
                raise _ConnectionError(h2.PROTOCOL_ERROR, f"HEADERS on stream {stream}")
            block = _checked(h2.header_payload, flags, payload)
            if flags & h2.END_HEADERS:
                self._headers(stream, flags, block)
            else:
                self._continued = (stream, flags, bytearray(block))
        elif kind == h2.CONTINUATION:
            if self._continued is None or self._continued[0] != stream:
                raise _ConnectionError(h2.PROTOCOL_ERROR, "CONTINUATION out of place")
            self._continued[2].extend(payload)
            if len(self._continued[2]) > MAX_HEADER_LIST:
                raise _ConnectionError(h2.PROTOCOL_ERROR, "a header block past its limit")
            if flags & h2.END_HEADERS:
                stream, first_flags, block = self._continued
                self._continued = None
                self._headers(stream, first_flags, bytes(block))
        elif kind == h2.WINDOW_UPDATE:
            self._window_update(stream, payload)
        elif kind == h2.SETTINGS:
            if not flags & h2.ACK:
                self._settings(_checked(h2.parse_settings, payload))
        elif kind == h2.PING:
            if not flags & h2.ACK:
                self.out.append(h2.frame(h2.PING, h2.ACK, 0, payload))
        elif kind == h2.RST_STREAM:
            call = self.calls.pop(stream, None)
            if call is not None:
                call.reset()
                self.server.calls_changed()
        elif kind == h2.PUSH_PROMISE:
            raise _ConnectionError(h2.PROTOCOL_ERROR, "a client sent PUSH_PROMISE")
        # PRIORITY, GOAWAY (the client closes when done) and unknown frames: nothing to do.

    def _data(self, flags: int, stream: int, payload: bytes) -> None:
        if stream == 0:
            raise _ConnectionError(h2.PROTOCOL_ERROR, "DATA on stream 0")
        self._received += len(payload)
        call = self.calls.get(stream)
        if call is None:
            return  # a call already answered or reset: its bytes still count for the window
        call.unacked += len(payload)
        call.received(_checked(h2.unpadded, flags, payload), flags & h2.END_STREAM)
        self.credit(call)

    def credit(self, call: _Call) -> None:
        """Let a stream's client send more, unless its handler has a window's worth of
        whole messages still unread (a message in the making is bounded by the size limit)."""
        if (call.unacked >= STREAM_WINDOW // 4 and not call.half_closed
                and call.unread < STREAM_WINDOW):
            self.out.append(h2.window_update(call.stream, call.unacked))
            call.unacked = 0

    def _headers(self, stream: int, flags: int, block: bytes) -> None:
        call = self.calls.get(stream)
        try:
            if call is not None:  # trailers: a client's stream ends with them
                self._heads.fields(block)
                if flags & h2.END_STREAM:
                    call.received(b"", True)
                return
            head = self._heads.head(block)
        except hpack.HPACKError as error:
            raise _ConnectionError(h2.COMPRESSION_ERROR, f"header block: {error}") from None
        if stream <= self._last_stream:
            raise _ConnectionError(h2.PROTOCOL_ERROR, f"stream {stream} reused")
        self._last_stream = stream
        if self._going_away:
            self.out.append(h2.rst_stream(stream, h2.REFUSED_STREAM))
            return
        call = _Call(self, stream, head)
        self.calls[stream] = call
        call.begin()
        if flags & h2.END_STREAM and not call.finished:
            call.received(b"", True)

    def _window_update(self, stream: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(h2.FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream == 0:
            if increment == 0:
                raise _ConnectionError(h2.PROTOCOL_ERROR, "a window update of 0")
            self.send_window += increment
            for call in list(self.blocked.values()):
                call.push()
        elif (call := self.calls.get(stream)) is not None:
            call.send_window += increment
            call.push()

    def _settings(self, settings: dict[int, int]) -> None:
        if h2.INITIAL_WINDOW_SIZE in settings:
            window = settings[h2.INITIAL_WINDOW_SIZE]
            if window > h2.MAX_WINDOW:
                raise _ConnectionError(h2.FLOW_CONTROL_ERROR, "initial window too large")
            change, self.peer_window = window - self.peer_window, window
            for call in self.calls.values():
                call.send_window += change
        if h2.MAX_FRAME_SIZE in settings:
            self.peer_frame = settings[h2.MAX_FRAME_SIZE]
        self.out.append(h2.frame(h2.SETTINGS, h2.ACK, 0))
        for call in list(self.blocked.values()):
            call.push()

    def header_frames(self, stream: int, block: bytes, end_stream: bool) -> None:
        flags = h2.END_STREAM if end_stream else 0
        limit = self.peer_frame
        if len(block) <= limit:
            self.out.append(h2.frame(h2.HEADERS, flags | h2.END_HEADERS, stream, block))
            return
        self.out.append(h2.frame(h2.HEADERS, flags, stream, block[:limit]))
        for start in range(limit, len(block), limit):
            last = start + limit >= len(block)
            self.out.append(h2.frame(h2.CONTINUATION, h2.END_HEADERS if last else 0, stream,
                                      block[start:start + limit]))

    def closed(self, call: _Call) -> None:
        self.calls.pop(call.stream, None)
        self.blocked.pop(call.stream, None)
        if not self.calls:
            self.server.calls_changed()
        self.schedule_flush()


def _checked(parse, *args):
    try:
        return parse(*args)
    except ValueError as error:
        raise _ConnectionError(h2.PROTOCOL_ERROR, str(error)) from None


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


class _Call:
    """One stream: its requests as they arrive, its handler's task, and the context that
    handler is given (the `grpc.aio.ServicerContext` methods)."""

    def __init__(self, connection: _Connection, stream: int, head: h2.RequestHead) -> None:
        self.connection = connection
        self.stream = stream
        self.send_window = connection.peer_window
        self.unacked = 0  # bytes received and not yet acknowledged with a WINDOW_UPDATE
        self.unread = 0  # bytes of whole messages the handler has not read yet
        self.half_closed = False
        self.finished = False
        self._path = head.path
        self._encoding = head.encoding
        self._metadata = head.metadata
        self._deadline = (None if head.timeout is None
                          else connection.loop.time() + head.timeout)
        self._partial = bytearray()
        self._messages: deque[bytes] = deque()
        self._arrived: asyncio.Future | None = None
        self._outbox: deque[memoryview] = deque()  # answer bytes the windows hold back
        self._unsent = 0
        self._closing: bytes | None = None
        self._drained: asyncio.Future | None = None
        self._headers_sent = False
        self._initial: tuple = ()
        self._handler: grpc.RpcMethodHandler | None = None
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False
        self._reset = False
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: tuple = ()

    # --- requests in -----------------------------------------------------------------------

    def begin(self) -> None:
        handler = self.connection.server.handler(self._path, self._metadata)
        if handler is None:
            self._finish_now(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            return
        self._handler = handler
        if self._deadline is not None:
            self._timer = self.connection.loop.call_at(self._deadline, self._expire)
        if handler.request_streaming:
            self._start()

    def received(self, data: bytes, end: bool) -> None:
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
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)
        if end and self._task is None and self._handler is not None:
            self._start()

    def _split(self, data: bytes) -> None:
        partial = self._partial
        partial += data
        limit = self.connection.server.max_receive
        while len(partial) >= 5:
            compressed, size = h2.MESSAGE_PREFIX.unpack_from(partial)
            if size > limit:
                raise _Status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"Received message larger than max ({size} vs. {limit})")
            if len(partial) < 5 + size:
                return
            payload = bytes(partial[5:5 + size])
            del partial[:5 + size]
            message = self._decompressed(payload) if compressed else payload
            self._messages.append(message)
            self.unread += len(message)

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

    async def _next_message(self) -> bytes | None:
        while not self._messages:
            if self.half_closed or self._reset:
                return None
            self._arrived = self.connection.loop.create_future()
            await self._arrived
        message = self._messages.popleft()
        self.unread -= len(message)
        if self.unacked:
            self.connection.credit(self)
            self.connection.schedule_flush()
        return message

    async def _requests(self, decode):
        while (message := await self._next_message()) is not None:
            yield message if decode is None else decode(message)

    # --- the handler -----------------------------------------------------------------------

    def _start(self) -> None:
        self._task = self.connection.loop.create_task(self._serve(self._handler))

    async def _serve(self, handler: grpc.RpcMethodHandler) -> None:
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
        if len(self._messages) != 1 or self._partial:
            raise _Status(grpc.StatusCode.INTERNAL,
                          f"a unary call needs one request message, got {len(self._messages)}")
        message = self._messages.popleft()
        return message if decode is None else decode(message)

    def _expire(self) -> None:
        self._expired = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        elif not self.finished:
            self._finish_now(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def reset(self) -> None:
        """The client reset the stream, or the connection is gone: no answer will be read."""
        self._reset = True
        self.finished = True
        self._outbox.clear()
        self._unsent = 0
        self.connection.blocked.pop(self.stream, None)
        self._end()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    # --- answers out -----------------------------------------------------------------------

    def _send_message(self, answer) -> None:
        serialize = self._handler.response_serializer
        payload = answer if serialize is None else serialize(answer)
        if len(payload) > self.connection.server.max_send:
            raise _Status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"Sent message larger than max ({len(payload)} vs. "
                          f"{self.connection.server.max_send})")
        self._open()
        data = h2.message(payload)
        self._outbox.append(memoryview(data))
        self._unsent += len(data)
        self.push()

    def _open(self) -> None:
        if not self._headers_sent:
            self._headers_sent = True
            self.connection.header_frames(self.stream, h2.response_headers(self._initial),
                                          False)

    def push(self) -> None:
        """Send what the windows allow; the trailers once everything before them is sent."""
        connection = self.connection
        outbox = self._outbox
        while outbox:
            size = min(self.send_window, connection.send_window, connection.peer_frame)
            if size <= 0:
                connection.blocked[self.stream] = self
                connection.schedule_flush()
                return
            chunk = outbox[0]
            if len(chunk) <= size:  # a whole message, as most answers go: no copy
                outbox.popleft()
            else:
                chunk, outbox[0] = chunk[:size], chunk[size:]
            connection.out.append(h2.frame(h2.DATA, 0, self.stream, chunk))
            self._unsent -= len(chunk)
            self.send_window -= len(chunk)
            connection.send_window -= len(chunk)
        connection.blocked.pop(self.stream, None)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
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
        self._outbox.clear()
        self._unsent = 0
        self._finish(code, details)

    def _end(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # --- grpc.aio.ServicerContext ------------------------------------------------------------

    async def read(self):
        message = await self._next_message()
        if message is None:
            return grpc.aio.EOF
        decode = self._handler.request_deserializer
        return message if decode is None else decode(message)

    async def write(self, message) -> None:
        if self.finished:
            raise asyncio.CancelledError()
        self._send_message(message)
        while self._unsent > WRITE_BACKLOG and not self.finished:
            self._drained = self.connection.loop.create_future()
            await self._drained

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
