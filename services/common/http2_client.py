"""A gRPC client written on HTTP/2 directly, for the group streams between hops.

gRPC's asyncio channel passes every message between the event loop and a thread of its own
that polls gRPC's core; at concurrency 1 that hand-off was most of a hop's client CPU. This
client writes and reads frames on the event loop itself, with the frames and HPACK of
`meshserve.common.http2_frames` and the flow control the services' server uses too
(`meshserve.common.http2_connection`).

It opens streaming calls, `channel.stream_stream(path)(metadata=...)`, with the methods of
`grpc.aio.StreamStreamCall` that `meshserve.common.streams` uses: `write`, `done_writing`,
`read` (bytes, then `grpc.aio.EOF`; a call that ended with an error raises
`grpc.aio.AioRpcError`), `cancel`, `code`, `details`, `done`. A channel keeps one connection,
with mutual TLS (ALPN h2, the server's certificate checked against the identity expected),
opened on the first call and again after it breaks or goes away; after a failed connection,
calls fail at once (UNAVAILABLE) until a backoff has passed, as on a gRPC channel. Keepalive
pings find a dead peer; message limits are gRPC's (RESOURCE_EXHAUSTED). Unary calls, health
and xDS stay on grpcio's channels.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from urllib.parse import unquote

import grpc
import hpack

from meshserve.common import http2_frames as h2
from meshserve.common.http2_connection import (
    MAX_HEADER_LIST,
    Http2Connection,
    Http2Stream,
    initial_frames,
)
from meshserve.common.tls import (
    KEEPALIVE_TIME_MS,
    KEEPALIVE_TIMEOUT_MS,
    MAX_MESSAGE_BYTES,
    TlsFiles,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 20.0  # gRPC's least connect timeout
BACKOFF_FIRST_S, BACKOFF_MAX_S, BACKOFF_FACTOR = 1.0, 120.0, 1.6  # gRPC's connection backoff
CANCEL = 0x8  # RST_STREAM's CANCEL
LAST_STREAM_ID = (1 << 31) - 1
# The status of a call its server reset without trailers, by the reset's error code.
_RESET_STATUS = {h2.REFUSED_STREAM: grpc.StatusCode.UNAVAILABLE, CANCEL: grpc.StatusCode.CANCELLED}
# The status of an answer whose HTTP status is not 200 (gRPC's HTTP/2 protocol document).
_HTTP_STATUS = {400: grpc.StatusCode.INTERNAL, 401: grpc.StatusCode.UNAUTHENTICATED,
                403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.UNIMPLEMENTED,
                429: grpc.StatusCode.UNAVAILABLE, 502: grpc.StatusCode.UNAVAILABLE,
                503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.UNAVAILABLE}
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def client_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """Mutual TLS as a client: present `files.cert`, trust servers that chain to `files.ca`
    (their names are checked against the identity each connection expects), ALPN h2."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=files.ca)
    context.load_cert_chain(files.cert, files.key)  # refuses a mismatched pair
    context.set_alpn_protocols(["h2"])
    return context


def address(target: str) -> tuple[str, int]:
    """The host and port of a target: host:port, [v6]:port, or dns:///host:port."""
    rest = target.removeprefix("dns:///")
    host, colon, port = rest.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ValueError(f"target {target!r} is not host:port")
    return host.strip("[]"), int(port)


def target_argument(text: str) -> str:
    """An argparse type: a target this client can dial (see `address`)."""
    try:
        address(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class Http2Channel:
    """Streaming calls to `target`, whose certificate must name `identity` (the :authority)."""

    def __init__(self, target: str, context: ssl.SSLContext, identity: str) -> None:
        self.target = target
        self.identity = identity
        self._host, self._port = address(target)
        self._context = context
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task | None = None
        self._waiting: list[_Call] = []  # calls started while connecting
        self._failed_until = 0.0  # the event loop's time; calls fail at once before it
        self._failure = ""
        self._backoff = BACKOFF_FIRST_S
        self._closed = False

    def __repr__(self) -> str:
        return f"{self.identity} at {self.target}"

    def stream_stream(self, method: str, request_serializer=None,
                      response_deserializer=None) -> Callable[..., _Call]:
        """A multicallable, as `grpc.aio.Channel.stream_stream` gives."""
        def start(metadata=None) -> _Call:
            call = _Call(self, method, tuple(metadata or ()), request_serializer,
                         response_deserializer)
            self._attach(call)
            return call
        return start

    def _attach(self, call: _Call) -> None:
        loop = asyncio.get_running_loop()
        if self._closed:
            call.end(grpc.StatusCode.CANCELLED, "the channel is closed")
        elif self._connection is not None and self._connection.usable():
            self._connection.open(call)
        elif loop.time() < self._failed_until:
            call.end(grpc.StatusCode.UNAVAILABLE, self._failure)
        else:
            self._waiting.append(call)
            if self._connecting is None:
                self._connecting = loop.create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(loop.create_connection(
                lambda: _Connection(self), self._host, self._port, ssl=self._context,
                server_hostname=self.identity), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as error:
            why = str(error) or (
                f"the connection and TLS handshake took over {CONNECT_TIMEOUT_S:g} s"
                if isinstance(error, TimeoutError) else type(error).__name__)
            self._failure = f"could not connect to {self}: {why}"
            self._failed_until = loop.time() + self._backoff
            self._backoff = min(self._backoff * BACKOFF_FACTOR, BACKOFF_MAX_S)
            waiting, self._waiting = self._waiting, []
            for call in waiting:
                call.end(grpc.StatusCode.UNAVAILABLE, self._failure)
            return
        finally:
            self._connecting = None
        self._backoff = BACKOFF_FIRST_S
        self._connection = connection
        waiting, self._waiting = self._waiting, []
        for call in waiting:
            if not call.finished:
                self._attach(call)

    def renew(self, context: ssl.SSLContext) -> None:
        """Open the next connection with `context` (rotated certificates): the current one
        takes no new call and closes once its calls have ended."""
        self._context = context
        if self._connection is not None:
            self._connection.retire()

    def lost(self, connection: _Connection) -> None:
        if self._connection is connection:
            self._connection = None

    async def close(self, grace: float | None = None) -> None:
        """No new calls; open ones may finish within `grace` seconds, then are cancelled."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connecting
        for call in self._waiting:
            call.end(grpc.StatusCode.CANCELLED, "the channel is closed")
        self._waiting.clear()
        connection = self._connection
        if connection is None:
            return
        if grace:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(connection.quiet(), grace)
        connection.close(grpc.StatusCode.CANCELLED, "the channel is closed")


class _Connection(Http2Connection):
    """One HTTP/2 connection to the server: calls opened on it, frames in and out."""

    def __init__(self, channel: Http2Channel) -> None:
        super().__init__()
        self.channel = channel
        self._next_stream = 1
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        self._going_away = False
        self._heard = self.loop.time()
        self._keepalive: asyncio.TimerHandle | None = None
        self._ping_sent: float | None = None
        self._quiet: asyncio.Future | None = None

    def usable(self) -> bool:
        return (self._transport is not None and not self._transport.is_closing()
                and not self._going_away and self._next_stream < LAST_STREAM_ID)

    # --- transport -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        transport.write(h2.PREFACE + initial_frames())
        self._keepalive = self.loop.call_later(KEEPALIVE_TIME_MS / 1e3, self._check_alive)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._keepalive is not None:
            self._keepalive.cancel()
        self.channel.lost(self)
        why = f"the connection to {self.channel} broke"
        for call in list(self.calls.values()):
            call.end(grpc.StatusCode.UNAVAILABLE, f"{why}: {exc}" if exc else why)

    def close(self, code: grpc.StatusCode, details: str) -> None:
        for call in list(self.calls.values()):
            call.end(code, details)
            self.out.append(h2.rst_stream(call.stream, CANCEL))
        self.calls.clear()
        self.out.append(h2.goaway(0))
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def _check_alive(self) -> None:
        """Ping after KEEPALIVE_TIME_MS without a frame from the server; close the connection
        (its calls fail UNAVAILABLE) when the ping is not answered in KEEPALIVE_TIMEOUT_MS."""
        now = self.loop.time()
        if self._ping_sent is not None and now - self._ping_sent >= KEEPALIVE_TIMEOUT_MS / 1e3:
            log.warning("%s did not answer a keepalive ping: closing the connection",
                        self.channel)
            if self._transport is not None:
                self._transport.abort()
            return
        if self._ping_sent is None and now - self._heard >= KEEPALIVE_TIME_MS / 1e3:
            self._ping_sent = now
            self.out.append(h2.frame(h2.PING, 0, 0, b"keepaliv"))
            self.schedule_flush()
            wait = KEEPALIVE_TIMEOUT_MS / 1e3
        elif self._ping_sent is not None:
            wait = self._ping_sent + KEEPALIVE_TIMEOUT_MS / 1e3 - now
        else:
            wait = self._heard + KEEPALIVE_TIME_MS / 1e3 - now
        self._keepalive = self.loop.call_later(wait, self._check_alive)

    # --- calls -----------------------------------------------------------------------------

    def open(self, call: _Call) -> None:
        stream, self._next_stream = self._next_stream, self._next_stream + 2
        self.calls[stream] = call
        self.header_frames(stream, call.head_block(), False)
        call.opened(self, stream)

    def retire(self) -> None:
        """No new call here; close once the open ones have ended."""
        self._going_away = True
        self.channel.lost(self)
        if not self.calls:
            self._no_calls()

    def _no_calls(self) -> None:
        if self._quiet is not None and not self._quiet.done():
            self._quiet.set_result(None)
        if self._going_away and self._transport is not None:
            self._flush()
            self._transport.close()

    async def quiet(self) -> None:
        """Until no call is open on this connection."""
        if self.calls:
            self._quiet = self.loop.create_future()
            await self._quiet

    # --- frames in -------------------------------------------------------------------------

    def buffer_updated(self, nbytes: int) -> None:
        self._heard = self.loop.time()
        super().buffer_updated(nbytes)

    def _fail(self, code: int, message: str) -> None:
        log.warning("closing the connection to %s: %s", self.channel, message)
        self.close(grpc.StatusCode.INTERNAL, f"{self.channel} broke HTTP/2: {message}")

    def _headers(self, stream: int, flags: int, block: bytes) -> None:
        fields = self._decoder.decode(block, raw=True)
        call = self.calls.get(stream)
        if call is not None:
            call.headers(fields, bool(flags & h2.END_STREAM))

    def _reset(self, stream: int, code: int) -> None:
        call = self.calls.get(stream)
        if call is not None:
            call.end(_RESET_STATUS.get(code, grpc.StatusCode.INTERNAL),
                     f"the server reset the stream (HTTP/2 error {code})")

    def _pinged(self) -> None:
        self._ping_sent = None

    def _go_away(self, payload: bytes) -> None:
        """No new calls here; calls the server never took fail UNAVAILABLE (a gRPC client
        sends them again), the others finish."""
        last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF if len(payload) >= 4 else 0
        for stream, call in list(self.calls.items()):
            if stream > last:
                call.end(grpc.StatusCode.UNAVAILABLE, f"{self.channel} is going away")
        self.retire()


class _Call(Http2Stream):
    """One streaming call: what it writes, as the windows allow, and what it reads."""

    def __init__(self, channel: Http2Channel, method: str, metadata: tuple,
                 serialize, deserialize) -> None:
        super().__init__(None, 0)  # opened on a connection once there is one
        self._channel = channel
        self._method = method
        self._metadata = metadata
        self._serialize = serialize
        self._deserialize = deserialize
        self._half_close = False  # END_STREAM once everything written is sent
        self._http_status = 200
        self._code = grpc.StatusCode.UNKNOWN
        self._details = ""
        self._done = asyncio.get_running_loop().create_future()
        # The server's initial metadata, once its headers came (empty for a call it ended
        # without sending any).
        self._initial = asyncio.get_running_loop().create_future()

    def head_block(self) -> bytes:
        block = (b"\x83\x87"  # :method POST, :scheme https (static table entries 3 and 7)
                 + h2.literal(b":path", self._method.encode())
                 + h2.literal(b":authority", self._channel.identity.encode())
                 + h2.literal(b"content-type", b"application/grpc")
                 + h2.literal(b"te", b"trailers")
                 + h2.literal(b"grpc-accept-encoding", b"identity"))
        return block + h2.metadata_block(self._metadata)

    def opened(self, connection: _Connection, stream: int) -> None:
        self.connection = connection
        self.stream = stream
        self.push()

    # --- answers in ------------------------------------------------------------------------

    def headers(self, fields: list[tuple[bytes, bytes]], end: bool) -> None:
        status, message = None, ""
        for name, value in fields:
            if name == b":status":
                self._http_status = int(value)
            elif name == b"grpc-status":
                status = int(value)
            elif name == b"grpc-message":
                message = unquote(value.decode("latin-1"))
        if not end:
            if not self._initial.done():
                self._initial.set_result(tuple(
                    (name.decode("latin-1"), value.decode("latin-1")) for name, value in fields
                    if not name.startswith(b":") and not name.endswith(b"-bin")))
            return
        if status is not None:
            self.end(_CODES.get(status, grpc.StatusCode.UNKNOWN), message)
        elif self._http_status != 200:
            self.end(_HTTP_STATUS.get(self._http_status, grpc.StatusCode.UNKNOWN),
                     f"the server answered HTTP status {self._http_status}")
        else:
            self.end(grpc.StatusCode.UNKNOWN, "the server ended the call without a status")

    def received(self, data: bytes | memoryview, end: bool) -> None:
        if self.finished:
            return
        try:
            messages = self._messages_in(data, MAX_MESSAGE_BYTES)
        except ValueError as error:
            self._abandon(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
            return
        for compressed, payload in messages:
            if compressed:
                self._abandon(grpc.StatusCode.INTERNAL,
                              "a compressed answer, though this client accepts identity only")
                return
            self._arrive(payload)
        self._wake()
        if end:
            self.end(grpc.StatusCode.INTERNAL, "the server ended the stream without trailers")

    # --- requests out ----------------------------------------------------------------------

    def push(self) -> None:
        """Send what the windows allow; END_STREAM once everything written is sent."""
        if self.connection is None or self.finished or not self._send_queued():
            return
        if self._half_close:
            self._half_close = False
            self.connection.out.append(h2.frame(h2.DATA, h2.END_STREAM, self.stream))
        self.connection.schedule_flush()

    def end(self, code: grpc.StatusCode, details: str) -> None:
        """The call is over with `code`: reads drain what came, then end with it."""
        if self.finished:
            return
        self.finished = self.half_closed = True
        self._code, self._details = code, details
        self._drop_queued()
        self._wake()
        self._done.set_result(None)
        if not self._initial.done():
            self._initial.set_result(())
        if self.connection is not None:
            self.connection.closed(self)

    def _abandon(self, code: grpc.StatusCode, details: str) -> None:
        """End the call here, and tell the server so."""
        if self.connection is not None and not self.finished:
            self.connection.out.append(h2.rst_stream(self.stream, CANCEL))
        self.end(code, details)

    # --- grpc.aio.StreamStreamCall ---------------------------------------------------------

    async def write(self, request) -> None:
        if self.finished:
            raise _error(self._code, self._details)
        payload = request if self._serialize is None else self._serialize(request)
        size = h2.payload_size(payload)
        if size > MAX_MESSAGE_BYTES:
            self._abandon(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"Sent message larger than max ({size} vs. {MAX_MESSAGE_BYTES})")
            raise _error(self._code, self._details)
        self._queue(payload, size)
        self.push()
        await self._wait_for_room()
        if self.finished and self._code != grpc.StatusCode.OK:
            raise _error(self._code, self._details)

    async def done_writing(self) -> None:
        if not self.finished:
            self._half_close = True
            self.push()

    async def read(self):
        message = await self._next_message()
        if message is not None:
            return message if self._deserialize is None else self._deserialize(message)
        if self._code == grpc.StatusCode.OK:
            return grpc.aio.EOF
        raise _error(self._code, self._details)

    def cancel(self) -> bool:
        if self.finished:
            return False
        self._abandon(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
        return True

    def done(self) -> bool:
        return self.finished

    async def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        """The server's initial metadata (text keys), once its headers came."""
        return await asyncio.shield(self._initial)

    async def code(self) -> grpc.StatusCode:
        await asyncio.shield(self._done)
        return self._code

    async def details(self) -> str:
        await asyncio.shield(self._done)
        return self._details
