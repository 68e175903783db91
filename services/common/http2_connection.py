"""What both ends of the project's HTTP/2 connections do alike (`meshserve.common.http2_server`
and `meshserve.common.http2_client`): frames in and out, SETTINGS, PING, flow control both
ways, and a stream's messages as they arrive and as the windows let them leave.

Flow control: a peer may send a stream a window's worth ahead of our acknowledgements, and
is held back while that stream has a window's worth of whole messages still unread; a peer
that sends past a window breaks the connection (FLOW_CONTROL_ERROR). Our own writers wait
while a backlog waits for the peer's windows.
"""

from __future__ import annotations

import asyncio
from collections import deque

import hpack

from meshserve.common import http2_frames as h2

# Our side of flow control: what a peer may send ahead of our acknowledgements.
STREAM_WINDOW = 4 << 20
CONNECTION_WINDOW = 16 << 20
MAX_FRAME = 1 << 20  # the largest frame we accept (16 KiB is HTTP/2's least)
MAX_HEADER_LIST = 64 << 10
# Reads go into place at the end of the connection's read buffer: at least this much room is
# offered for each. A buffer grown past KEEP_BUFFER (by a large frame) is given back once it
# has held nothing for SHRINK_AFTER_S.
READ_ROOM = 64 << 10
KEEP_BUFFER = 256 << 10
SHRINK_AFTER_S = 1.0
# A writer waits while this much of what it wrote waits for the peer's windows.
WRITE_BACKLOG = 1 << 20
# A message this large is written as it is, after its frame's header and its prefix, not
# copied into one piece with them (`h2.gathered`).
WRITE_APART = 32 << 10


class ConnectionFailure(Exception):
    """The peer broke HTTP/2: the connection ends with `code` (an HTTP/2 error code)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def checked(parse, *args):
    """`parse(*args)`, its ValueError a PROTOCOL_ERROR."""
    try:
        return parse(*args)
    except ValueError as error:
        raise ConnectionFailure(h2.PROTOCOL_ERROR, str(error)) from None


def initial_frames(max_streams: int | None = None) -> bytes:
    """Our SETTINGS (a server's with the streams a client may open at once) and the
    connection window beyond HTTP/2's default."""
    settings = {h2.ENABLE_PUSH: 0, h2.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.MAX_FRAME_SIZE: MAX_FRAME, h2.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST}
    if max_streams is not None:
        settings[h2.MAX_CONCURRENT_STREAMS] = max_streams
    return (h2.settings_frame(settings)
            + h2.window_update(0, CONNECTION_WINDOW - h2.DEFAULT_WINDOW))


def _on_stream_0(kind: int, stream: int) -> None:
    """A frame of the connection's own (SETTINGS, PING) must come on stream 0."""
    if stream:
        raise ConnectionFailure(h2.PROTOCOL_ERROR,
                                f"{h2.FRAME_NAMES.get(kind, kind)} on stream {stream}")


def _sized(kind: int, payload: bytes, size: int) -> None:
    """A frame of fixed size (PING: 8 bytes, RST_STREAM: 4) of another size."""
    if len(payload) != size:
        raise ConnectionFailure(h2.FRAME_SIZE_ERROR, f"{h2.FRAME_NAMES.get(kind, kind)} of "
                                f"{len(payload)} bytes (it has {size})")


class Http2Connection(asyncio.BufferedProtocol):
    """One connection's frames. Subclasses keep their streams in `calls` and handle HEADERS
    (`_headers`), RST_STREAM (`_reset`), GOAWAY (`_go_away`), a PING's answer (`_pinged`)
    and a broken connection (`_fail`).

    The transport decrypts each read straight into the connection's buffer (`get_buffer`),
    and a DATA frame's payload reaches its stream as a view of that buffer, so a message is
    copied once on its way in: out of the buffer, whole (`Http2Stream._messages_in`)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.calls: dict[int, Http2Stream] = {}
        self.blocked: dict[int, Http2Stream] = {}  # streams waiting for a window
        # Each stream's send window starts at the peer's initial window and moves with it
        # (SETTINGS), so a stream keeps only its own part: `window_delta`.
        self.peer_window = h2.DEFAULT_WINDOW
        self.peer_frame = h2.DEFAULT_FRAME_SIZE
        self.send_window = h2.DEFAULT_WINDOW  # the connection's
        self.out: list[bytes | memoryview] = []  # frames for the next write
        self.out_apart = False  # `out` holds a piece of WRITE_APART bytes or more
        self._use(bytearray(READ_ROOM))
        self._start = 0  # the first byte read and not handled yet
        self._end = 0  # the end of the bytes read
        self._shrink: asyncio.TimerHandle | None = None
        self._continued: tuple[int, int, bytearray] | None = None
        self._received = 0
        self._flush_pending = False
        self._transport: asyncio.Transport | None = None

    def schedule_flush(self) -> None:
        """Write what is waiting once this turn of the event loop is done (frames made in
        the same turn leave in one write)."""
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        self._write()

    def _write(self) -> None:
        out = self.out
        if out and self._transport is not None and not self._transport.is_closing():
            if self.out_apart:
                self._transport.writelines(h2.gathered(out, WRITE_APART))
            else:
                self._transport.write(b"".join(out))
        out.clear()
        self.out_apart = False

    # --- frames in -------------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        """Room for the next read after the bytes not handled yet: as much as the transport
        holds (`sizehint`), READ_ROOM at least."""
        room = sizehint if sizehint > READ_ROOM else READ_ROOM
        if len(self._buffer) - self._end < room:
            self._make_room(room)
        return self._view[self._end:]

    def _make_room(self, room: int) -> None:
        """The bytes not handled yet move to the front, or into a buffer twice the size when
        they would not leave `room` after them."""
        start, kept = self._start, self._end - self._start
        if kept + room <= len(self._buffer):
            self._view[:kept] = self._view[start:self._end]
        else:
            grown = bytearray(max(kept + room, 2 * len(self._buffer)))
            grown[:kept] = self._view[start:self._end]
            self._use(grown)
        self._start, self._end = 0, kept

    def _use(self, buffer: bytearray) -> None:
        self._buffer, self._view = buffer, memoryview(buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        self._frames_in()

    def _frames_in(self) -> None:
        """Handle every whole frame read, then write what they called for. A DATA frame's
        payload is a view of the read buffer, valid only while its stream takes it."""
        buffer, view = self._buffer, self._view
        position, end = self._start, self._end
        unpack = h2.FRAME_HEADER.unpack_from
        try:
            while end - position >= 9:
                high, low, kind, flags, stream = unpack(buffer, position)
                size = high << 16 | low
                if size > MAX_FRAME:
                    raise ConnectionFailure(h2.FRAME_SIZE_ERROR, f"a frame of {size} bytes")
                if end - position - 9 < size:
                    break
                payload = view[position + 9:position + 9 + size]
                position += 9 + size
                self._frame(kind, flags, stream & 0x7FFFFFFF,
                            payload if kind == h2.DATA else bytes(payload))
        except ConnectionFailure as error:
            self._fail(error.code, str(error))
            return
        if position == end:  # all handled: the next read starts at the front
            position = self._end = 0
            if len(buffer) > KEEP_BUFFER and self._shrink is None:
                self._shrink = self.loop.call_later(SHRINK_AFTER_S, self._shrink_if_empty)
        self._start = position
        if self._received >= CONNECTION_WINDOW // 4:
            self.out.append(h2.window_update(0, self._received))
            self._received = 0
        self._flush()

    def _shrink_if_empty(self) -> None:
        """A buffer that a large frame grew is given back once it has stayed empty for
        SHRINK_AFTER_S (else the next time it empties)."""
        self._shrink = None
        if self._start == self._end:
            self._use(bytearray(READ_ROOM))

    def _frame(self, kind: int, flags: int, stream: int, payload: bytes | memoryview) -> None:
        if self._continued is not None and kind != h2.CONTINUATION:
            raise ConnectionFailure(h2.PROTOCOL_ERROR, "a header block was interrupted")
        if kind == h2.DATA:
            self._data(flags, stream, payload)
        elif kind == h2.HEADERS:
            self._check_headers(stream)
            block = checked(h2.header_payload, flags, payload)
            if flags & h2.END_HEADERS:
                self._decoded_headers(stream, flags, block)
            else:
                self._continued = (stream, flags, bytearray(block))
        elif kind == h2.CONTINUATION:
            if self._continued is None or self._continued[0] != stream:
                raise ConnectionFailure(h2.PROTOCOL_ERROR, "CONTINUATION out of place")
            self._continued[2].extend(payload)
            if len(self._continued[2]) > MAX_HEADER_LIST:
                raise ConnectionFailure(h2.PROTOCOL_ERROR, "a header block past its limit")
            if flags & h2.END_HEADERS:
                stream, first_flags, block = self._continued
                self._continued = None
                self._decoded_headers(stream, first_flags, bytes(block))
        elif kind == h2.WINDOW_UPDATE:
            self._window_update(stream, payload)
        elif kind == h2.SETTINGS:
            _on_stream_0(kind, stream)
            if not flags & h2.ACK:
                self._settings(checked(h2.parse_settings, payload))
        elif kind == h2.PING:
            _on_stream_0(kind, stream)
            _sized(kind, payload, h2.PING_SIZE)
            if flags & h2.ACK:
                self._pinged()
            else:
                self.out.append(h2.frame(h2.PING, h2.ACK, 0, payload))
        elif kind == h2.RST_STREAM:
            _sized(kind, payload, 4)
            if stream == 0:
                raise ConnectionFailure(h2.PROTOCOL_ERROR, "RST_STREAM on stream 0")
            self._reset(stream, int.from_bytes(payload, "big"))
        elif kind == h2.GOAWAY:
            self._go_away(payload)
        elif kind == h2.PUSH_PROMISE:
            raise ConnectionFailure(h2.PROTOCOL_ERROR, "PUSH_PROMISE, which is disabled")
        # PRIORITY and unknown frames: nothing to do.

    def _data(self, flags: int, stream: int, payload: memoryview) -> None:
        if stream == 0:
            raise ConnectionFailure(h2.PROTOCOL_ERROR, "DATA on stream 0")
        self._received += len(payload)
        if self._received > CONNECTION_WINDOW:
            raise ConnectionFailure(h2.FLOW_CONTROL_ERROR, f"{self._received} bytes of DATA "
                                    f"past the connection's window of {CONNECTION_WINDOW}")
        call = self.calls.get(stream)
        if call is None:
            return  # a stream already ended or reset: its bytes still count for the window
        call.unacked += len(payload)
        if call.unacked > STREAM_WINDOW:
            raise ConnectionFailure(h2.FLOW_CONTROL_ERROR, f"{call.unacked} bytes of DATA "
                                    f"past stream {stream}'s window of {STREAM_WINDOW}")
        call.received(checked(h2.unpadded, flags, payload), flags & h2.END_STREAM)
        self.credit(call)

    def _decoded_headers(self, stream: int, flags: int, block: bytes) -> None:
        try:
            self._headers(stream, flags, block)
        except hpack.HPACKError as error:
            raise ConnectionFailure(h2.COMPRESSION_ERROR, f"header block: {error}") from None

    def credit(self, call: Http2Stream) -> None:
        """Let the peer send more on a stream, unless a window's worth of whole messages is
        still unread there (a message in the making is bounded by the size limit)."""
        if (call.unacked >= STREAM_WINDOW // 4 and not call.half_closed
                and call.unread < STREAM_WINDOW):
            self.out.append(h2.window_update(call.stream, call.unacked))
            call.unacked = 0

    def _window_update(self, stream: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionFailure(h2.FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream == 0:
            if increment == 0:
                raise ConnectionFailure(h2.PROTOCOL_ERROR, "a window update of 0")
            self.send_window += increment
            if self.send_window > h2.MAX_WINDOW:
                raise ConnectionFailure(h2.FLOW_CONTROL_ERROR, "a window update past "
                                        f"{h2.MAX_WINDOW} bytes on the connection")
            for call in list(self.blocked.values()):
                call.push()
        elif (call := self.calls.get(stream)) is not None:
            call.window_delta += increment
            if self.peer_window + call.window_delta > h2.MAX_WINDOW:
                raise ConnectionFailure(h2.FLOW_CONTROL_ERROR, "a window update past "
                                        f"{h2.MAX_WINDOW} bytes on stream {stream}")
            call.push()

    def _settings(self, settings: dict[int, int]) -> None:
        if h2.INITIAL_WINDOW_SIZE in settings:
            window = settings[h2.INITIAL_WINDOW_SIZE]
            if window > h2.MAX_WINDOW:
                raise ConnectionFailure(h2.FLOW_CONTROL_ERROR, "initial window too large")
            self.peer_window = window  # every stream's window moves with it, at no cost
        if h2.MAX_FRAME_SIZE in settings:
            self.peer_frame = settings[h2.MAX_FRAME_SIZE]
        self.out.append(h2.frame(h2.SETTINGS, h2.ACK, 0))
        for call in list(self.blocked.values()):
            call.push()

    def closed(self, call: Http2Stream) -> None:
        """`call` is over: forget it, and write what it left."""
        self.calls.pop(call.stream, None)
        self.blocked.pop(call.stream, None)
        if not self.calls:
            self._no_calls()
        self.schedule_flush()

    # --- frames out ------------------------------------------------------------------------

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

    # --- what each end does its own way ------------------------------------------------------

    def _check_headers(self, stream: int) -> None:
        """Raise ConnectionFailure for HEADERS this end must not receive on `stream`."""

    def _headers(self, stream: int, flags: int, block: bytes) -> None:
        raise NotImplementedError

    def _reset(self, stream: int, code: int) -> None:
        raise NotImplementedError

    def _go_away(self, payload: bytes) -> None:
        """The peer is going away (a server: its client closes when done)."""

    def _pinged(self) -> None:
        """Our PING was answered."""

    def _fail(self, code: int, message: str) -> None:
        raise NotImplementedError

    def _no_calls(self) -> None:
        """The last open call on this connection ended."""


class Http2Stream:
    """One stream's messages: those received, until the handler or caller reads them, and
    those written, until the windows let them leave."""

    def __init__(self, connection: Http2Connection | None, stream: int) -> None:
        self.connection = connection
        self.stream = stream
        self.window_delta = 0  # this stream's send window less the peer's initial window
        self.unacked = 0  # bytes received and not yet acknowledged with a WINDOW_UPDATE
        self.unread = 0  # bytes of whole messages not read yet
        self.half_closed = False  # the peer sends nothing more
        self.finished = False
        self._partial = bytearray()
        self._messages: deque[bytes] = deque()
        self._arrived: asyncio.Future | None = None
        self._outbox: deque[memoryview] = deque()  # bytes the windows hold back
        self._unsent = 0
        self._drained: asyncio.Future | None = None

    def received(self, data: bytes | memoryview, end: bool) -> None:
        """A DATA frame's payload (a view of the connection's read buffer: copy what is
        kept), and whether the peer's side of the stream ends with it."""
        raise NotImplementedError

    def push(self) -> None:
        raise NotImplementedError

    def _messages_in(self, data: bytes | memoryview, limit: int) -> list[tuple[bool, bytes]]:
        """The whole messages that `data` completes: (compressed, payload), each copied
        once, straight from `data` when no message was already in the making; the bytes of
        the next one kept. Raises ValueError naming the limit for a message larger than
        `limit`."""
        partial = self._partial
        if not partial:
            taken, used = h2.whole_messages(data, limit)
            if used < len(data):
                partial += data[used:]
            return taken
        partial += data
        with memoryview(partial) as view:
            taken, used = h2.whole_messages(view, limit)
        del partial[:used]
        return taken

    def _arrive(self, message: bytes) -> None:
        self._messages.append(message)
        self.unread += len(message)

    def _wake(self) -> None:
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)

    async def _next_message(self) -> bytes | None:
        """The next whole message; None once no more will come."""
        while not self._messages:
            if self.half_closed or self.finished:
                return None
            self._arrived = asyncio.get_running_loop().create_future()
            await self._arrived
        message = self._messages.popleft()
        self.unread -= len(message)
        if self.unacked:
            self.connection.credit(self)
            self.connection.schedule_flush()
        return message

    def _queue(self, payload: h2.Payload, size: int) -> None:
        """A message of `size` bytes to send: one piece with its prefix, or a large one
        (WRITE_APART bytes or more) as it is after its prefix (given in pieces: each run of
        small ones joined, each large one as it is)."""
        if not isinstance(payload, list):
            pieces = (payload,)
        elif max(map(len, payload), default=0) < WRITE_APART:
            pieces = (b"".join(payload),)  # no piece to keep apart: one join, in C
        else:
            pieces = h2.gathered(payload, WRITE_APART)
        if size < WRITE_APART:
            self._outbox.append(memoryview(h2.message(pieces[0])))
        else:
            self._outbox.append(memoryview(h2.message_prefix(size)))
            self._outbox.extend(map(memoryview, pieces))
        self._unsent += 5 + size

    def _send_queued(self) -> bool:
        """Send what the windows allow; True when nothing queued is left (the stream then
        waits for no window)."""
        connection = self.connection
        outbox = self._outbox
        while outbox:
            size = min(connection.peer_window + self.window_delta, connection.send_window,
                       connection.peer_frame)
            if size <= 0:
                connection.blocked[self.stream] = self
                connection.schedule_flush()
                return False
            chunk = outbox[0]
            if len(outbox) == 1 and len(chunk) <= size:  # a small message, as most are
                outbox.popleft()
                pieces, taken = (chunk,), len(chunk)
                if taken >= WRITE_APART:  # the rest of a large one
                    connection.out_apart = True
            else:  # one DATA frame of what the windows allow: its pieces are not copied here
                pieces, taken = [], 0
                while outbox and taken < size:
                    chunk = outbox[0]
                    if len(chunk) <= size - taken:
                        outbox.popleft()
                    else:
                        chunk, outbox[0] = chunk[:size - taken], chunk[size - taken:]
                    pieces.append(chunk)
                    taken += len(chunk)
                    if len(chunk) >= WRITE_APART:
                        connection.out_apart = True
            connection.out.append(h2.frame_header(h2.DATA, 0, self.stream, taken))
            connection.out += pieces
            self._unsent -= taken
            self.window_delta -= taken
            connection.send_window -= taken
        connection.blocked.pop(self.stream, None)
        self._release()
        return True

    def _drop_queued(self) -> None:
        self._outbox.clear()
        self._unsent = 0
        self._release()

    def _release(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def _wait_for_room(self) -> None:
        """Until less than WRITE_BACKLOG of what was written waits for a window."""
        while self._unsent > WRITE_BACKLOG and not self.finished:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
