"""Long-lived group streams: how every internal hop carries its groups.

A hop keeps one bidirectional `GroupInference.Stream` per upstream and writes each group on it
as one message; the upstream answers each group with one message as soon as it is done, in any
order. A message is framed by its `group_id` (field 15, fixed64) written first, so a hop reads
and rewrites the id without parsing what the message carries: the router forwards groups as
bytes. On loopback with mutual TLS a message on an open stream costs about half of a unary
call's CPU, and nothing per call.

Early answers: a hop that answers some of a group's items before the others (refused at once
for a full queue or a malformed request, or in a batch that finished while others of the group
still wait) may send those first, under `partial_group_id` (field 14) and listing their
positions; the last answer, under `group_id`, holds the rest. A refusal then comes back in
milliseconds instead of waiting for the group's slowest request, and each batch's requests
as soon as it is done.

Cancelling: a client whose wait for a group's answer is cancelled (its caller left) or timed
out writes a frame of the group's id under `cancel_group_id` (field 13) and no body, and drops
the group; the server cancels the task answering it, so each hop passes the cancellation on
to the next and compute tells the model's requests (`is_cancelled()`). A server ignores the
cancel of a group it is not answering (answered already, or never read). A server says in
its stream's initial metadata that it reads cancel frames (`CANCELS`), and a client writes
them only to one that said so: a server of an earlier release, during a rolling upgrade,
would end the whole stream on a frame it does not know.

Draining: a server that stops sends each open stream a frame with id 0 and no body (go away);
the client then writes nothing more on that stream, half-closes it, and opens a new one for
its next group, while the server answers what it already read. A group that a stream never
answered (the server died, or ended the stream) fails with `StreamBroken`, and the caller
decides whether to send it again: inference is a pure function of the group.

Backpressure: a server holds the groups it is answering, across all its streams, up to a
byte budget (`Handling`); past it, it reads no more from any stream until answers free room,
so HTTP/2's flow control holds each peer's further groups in that peer, where its own bound
(the ingress's bytes in flight) applies. A group sent in one unary call past the budget is
refused RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import Awaitable, Callable

import grpc

from meshserve.common.errors import retry_hint
from meshserve.common.server import abort_with

log = logging.getLogger(__name__)

ID_TAG = 0x79  # field 15 (group_id), wire type 1 (fixed64): a group's last answer
PARTIAL_TAG = 0x71  # field 14 (partial_group_id): an early answer to part of a group
CANCEL_TAG = 0x69  # field 13 (cancel_group_id): the client gives a group up
HEAD = 9  # the tag byte and eight bytes of id
GO_AWAY = 0  # the id of the frame that tells a client to move to a new stream
CANCELS = ("meshserve-group-frames", "cancel")  # a server's initial metadata: it reads them

STREAM = "Stream"
INFER = "Infer"
# Bytes of groups a server holds while it answers them, across all its streams: as much as
# the ingress lets be in flight, so groups from the mesh's own hops never wait for it.
MAX_HANDLING = 256 << 20
# The hint given with a unary group refused for want of room: about a group's round trip.
REFUSED_RETRY_AFTER_S = 0.05


def frame(group_id: int, body: bytes, partial: bool = False) -> bytes:
    """`body` (a serialized InferGroup or InferGroupResult) with its id written first; a
    `partial` answer (more follow) under `partial_group_id`."""
    return frame_head(group_id, partial) + body


def frame_head(group_id: int, partial: bool = False) -> bytes:
    return bytes((PARTIAL_TAG if partial else ID_TAG,)) + group_id.to_bytes(8, "little")


def cancel_frame(group_id: int) -> bytes:
    return bytes((CANCEL_TAG,)) + group_id.to_bytes(8, "little")


def cancelled_id(message: bytes) -> int | None:
    """The id a cancel frame gives up; None for any other message."""
    if len(message) == HEAD and message[0] == CANCEL_TAG:
        return int.from_bytes(message[1:HEAD], "little")
    return None


def unframe(message: bytes) -> tuple[int, memoryview, bool]:
    """The id, the body (a view of `message`: a group is not copied to drop its head) and
    whether it is a partial answer; ValueError when not framed."""
    if len(message) < HEAD or message[0] not in (ID_TAG, PARTIAL_TAG):
        raise ValueError("a stream message must start with its group_id (field 15, fixed64)")
    return (int.from_bytes(message[1:HEAD], "little"), memoryview(message)[HEAD:],
            message[0] == PARTIAL_TAG)


class StreamBroken(Exception):
    """The stream ended before it answered a group: `code` and `details` say how."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


OpenStream = Callable[[], grpc.aio.StreamStreamCall]
# Told of an early, partial answer to a group (a serialized InferGroupResult).
Early = Callable[[bytes | memoryview], Awaitable[None]]
# A group to send: its serialized bytes, or pieces whose join is its bytes (`serialized_group`).
Body = bytes | memoryview | list[bytes | memoryview]
# A group its stream never answered is sent once more: the peer went away (UNAVAILABLE), or
# gRPC cancelled the stream as the peer began to shut down (CANCELLED).
RESEND_ON = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
# The status gRPC's asyncio client gives a call, in place of the one the call would have ended
# with, when one of its operations fails in gRPC's core: as a write does when the connection
# under the stream breaks (its peer was killed).
LOCAL_FAILURE = (grpc.StatusCode.INTERNAL, "Internal error from Core")


def broken(code: grpc.StatusCode, details: str, upstream: str) -> StreamBroken:
    """Why a stream to `upstream` ended, from its status: OK counts as UNAVAILABLE (the server
    went away in good order), and so does gRPC's local failure (the connection broke)."""
    if code == grpc.StatusCode.OK:
        return StreamBroken(grpc.StatusCode.UNAVAILABLE, details or f"{upstream} ended the stream")
    if (code, details) == LOCAL_FAILURE:
        return StreamBroken(grpc.StatusCode.UNAVAILABLE,
                            f"the stream to {upstream} broke ({details})")
    return StreamBroken(code, details or code.name)


# The tasks writing a group on a grpc.aio call, each with whether a cancellation waits for
# its write to end: grpc.aio cancels a whole call, and every group on it, when one of its
# writes is cancelled.
_writing: dict[asyncio.Task, bool] = {}


def cancel(task: asyncio.Task) -> None:
    """Cancel `task` (a group's handler), once a write it is making on a grpc.aio call has
    ended (at once if none)."""
    if task in _writing:
        _writing[task] = True
    else:
        task.cancel()


async def _whole(call: grpc.aio.StreamStreamCall, message: list) -> None:
    """`message` written on a grpc.aio `call`; a cancellation through `cancel` meanwhile
    follows the write."""
    task = asyncio.current_task()
    _writing[task] = False
    try:
        await call.write(message)
    finally:
        if _writing.pop(task):
            task.cancel()


def _time_out(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class _Call:
    """One open stream and the groups waiting for its answers."""

    def __init__(self, call: grpc.aio.StreamStreamCall, opened: float) -> None:
        self.call = call
        self.opened = opened  # the event loop's time
        # grpc.aio cancels a whole call when one of its writes is cancelled (`_whole`).
        self.fragile = isinstance(call, grpc.aio.Call)
        self.pending: dict[int, tuple[asyncio.Future, Early | None]] = {}
        self.writing = asyncio.Lock()  # one write at a time on a call
        self.retiring = False  # told to go away: nothing more is written on it
        self.reader: asyncio.Task | None = None
        self.closing: asyncio.Task | None = None


class GroupStream:
    """The client side of one long-lived stream; opened on first use and again after it ends.

    `open_stream()` starts the call (a multicallable of `GroupInference/Stream` with no
    serializers, its metadata bound); `upstream` names the peer in errors. With `max_age`
    (seconds), the first group after a stream has been open that long opens a new one, and
    the old one finishes its groups: where a load balancer places each new stream, placements
    made while a peer was down or starting do not last.
    """

    def __init__(self, open_stream: OpenStream, upstream: str,
                 max_age: float | None = None) -> None:
        self._open = open_stream
        self.upstream = upstream
        self._max_age = max_age
        self._ids = itertools.count(1)
        self._current: _Call | None = None
        self._all: set[_Call] = set()
        self._telling: set[asyncio.Task] = set()  # cancel frames being written

    @property
    def in_flight(self) -> int:
        return sum(len(c.pending) for c in self._all)

    def _call(self) -> _Call:
        loop = asyncio.get_running_loop()
        current = self._current
        if (current is not None and self._max_age is not None
                and loop.time() - current.opened >= self._max_age):
            self._retire(current)
        if current is None or current.retiring:
            current = self._current = _Call(self._open(), loop.time())
            self._all.add(current)
            current.reader = loop.create_task(self._read(current))
        return current

    async def send(self, body: Body, timeout: float | None = None, *,
                   early: Early | None = None, resend: bool = True) -> bytes:
        """Write one group and wait for its (last) answer; `early`, when given, hears of
        each partial answer first (raises StreamBroken, TimeoutError). A group its stream
        ended without answering goes once more on a fresh stream, unless the caller retries
        elsewhere itself (`resend=False`)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            return await self._send_once(body, timeout, early)
        except StreamBroken as ended:
            if not resend or ended.code not in RESEND_ON:
                raise
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise TimeoutError from None
            return await self._send_once(body, left, early)

    def retire(self) -> None:
        """Open a new stream for the next group (new certificates); the current one finishes
        its groups."""
        if self._current is not None:
            self._retire(self._current)

    async def _send_once(self, body: Body, timeout: float | None,
                         early: Early | None) -> bytes:
        pieces = body if isinstance(body, list) else (body,)
        current = self._call()
        group_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        current.pending[group_id] = (future, early)
        written = False
        try:
            async with current.writing:
                if current.retiring or future.done():
                    raise StreamBroken(grpc.StatusCode.UNAVAILABLE,
                                       f"{self.upstream} is going away")
                try:
                    written = True  # from here the group may be on its way, whole
                    message = [frame_head(group_id), *pieces]
                    await (_whole(current.call, message) if current.fragile else
                           current.call.write(message))
                except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                    written = False
                    self._forget(current)  # the next group opens a fresh stream
                    if not future.done():
                        raise await self._ended(current.call) from None
            if timeout is None:
                return await future
            # A timer on the future itself: cheaper than a timeout scope per group.
            timer = asyncio.get_running_loop().call_later(timeout, _time_out, future)
            try:
                return await future
            except TimeoutError:
                self._give_up(current, group_id)  # no one waits for its answer now
                raise
            finally:
                timer.cancel()
        except asyncio.CancelledError:
            if written and (future.cancelled() or not future.done()):
                self._give_up(current, group_id)
            raise
        finally:
            current.pending.pop(group_id, None)
            # The future holds the error it raised here, whose traceback holds this frame:
            # dropped, the group's bytes go now, not at the collector's next full pass.
            future = None  # noqa: F841

    def _give_up(self, current: _Call, group_id: int) -> None:
        """Tell the server that the group `group_id` is given up (its caller was cancelled, or
        its time ran out)."""
        if current.retiring or current.call.done():
            return

        async def tell() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError,
                                     asyncio.InvalidStateError):
                if CANCELS not in tuple(await current.call.initial_metadata()):
                    return
                async with current.writing:
                    if not current.retiring:
                        await current.call.write([cancel_frame(group_id)])

        self._telling.add(task := asyncio.get_running_loop().create_task(tell()))
        task.add_done_callback(self._telling.discard)

    async def _read(self, current: _Call) -> None:
        call = current.call
        error: StreamBroken
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                group_id, body, partial = unframe(message)
                if group_id == GO_AWAY:
                    self._retire(current)
                    continue
                future, early = current.pending.get(group_id, (None, None))
                if future is None or future.done():
                    continue
                if not partial:
                    future.set_result(body)
                elif early is not None:
                    try:
                        await early(body)
                    except Exception:  # noqa: BLE001 — the last answer still comes
                        log.exception("an early answer from %s could not be used",
                                      self.upstream)
            error = await self._ended(call)
        except grpc.aio.AioRpcError as failure:
            error = broken(failure.code(), failure.details(), self.upstream)
        except ValueError as malformed:
            error = StreamBroken(grpc.StatusCode.INTERNAL,
                                 f"{self.upstream} sent a malformed message: {malformed}")
            call.cancel()
        except asyncio.CancelledError:
            error = StreamBroken(grpc.StatusCode.CANCELLED, "the stream was closed")
            raise
        finally:
            self._forget(current)
            self._all.discard(current)
            for future, _ in current.pending.values():
                if not future.done():
                    future.set_exception(error)

    async def _ended(self, call: grpc.aio.StreamStreamCall) -> StreamBroken:
        """Why `call` ended (it answered nothing more)."""
        return broken(await call.code(), await call.details(), self.upstream)

    def _forget(self, current: _Call) -> None:
        """Write nothing more on `current`."""
        current.retiring = True
        if self._current is current:
            self._current = None

    def _retire(self, current: _Call) -> None:
        """Write nothing more on `current` and half-close it; its answers still arrive."""
        if current.retiring:
            return
        self._forget(current)

        async def half_close() -> None:
            async with current.writing:
                with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError,
                                         asyncio.InvalidStateError):
                    await current.call.done_writing()

        current.closing = asyncio.get_running_loop().create_task(half_close())

    async def close(self) -> None:
        for task in list(self._telling):
            task.cancel()
        for current in list(self._all):
            current.call.cancel()
            if current.reader is not None:
                current.reader.cancel()
        await asyncio.gather(*(c.reader for c in list(self._all) if c.reader),
                             return_exceptions=True)
        self._all.clear()
        self._current = None


class Handling:
    """The bytes of groups a server is answering, and the budget they stay within."""

    def __init__(self, limit: int = MAX_HANDLING) -> None:
        self.limit = limit
        self.held = 0
        self._room: asyncio.Event | None = None  # set while under the limit

    @property
    def full(self) -> bool:
        return self.held >= self.limit

    def take(self, size: int) -> None:
        self.held += size

    def give(self, size: int) -> None:
        self.held -= size
        if self._room is not None and not self.full:
            self._room.set()

    async def room(self) -> None:
        """Wait until the groups held are under the budget."""
        while self.full:
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()
            await self._room.wait()

    def refusal(self) -> str:
        return (f"the server holds {self.held} bytes of groups it is answering, at its limit "
                f"of {self.limit}; {retry_hint(REFUSED_RETRY_AFTER_S)}")


# Answers a group's body (its last answer); may first pass partial answers to `early`
# (None where none are wanted: everything then comes in the last answer). Bodies and answers
# read off a stream are views of the message they came in (`unframe`): bytes-like, to parse
# or to forward.
Handle = Callable[[bytes | memoryview, Early | None], Awaitable[bytes]]


async def serve_stream(context: grpc.aio.ServicerContext, handle: Handle,
                       draining: asyncio.Event, handling: Handling) -> None:
    """Answer every group read from the stream with `handle(body)`, concurrently, each as soon
    as it is done, reading no further while `handling` is full; when draining, tell the
    client to go away and answer what it still sends until it half-closes. A handle that
    raises ends the stream with the error's status."""
    loop = asyncio.get_running_loop()
    writing = asyncio.Lock()
    tasks: dict[int, asyncio.Task] = {}  # by group id
    failure: list[BaseException] = []

    async def answer(group_id: int, body: memoryview) -> None:
        async def early(partial: bytes) -> None:
            async with writing:
                await context.write(frame(group_id, partial, partial=True))

        try:
            reply = await handle(body, early)
            async with writing:
                await context.write(frame(group_id, reply))
        except Exception as error:  # noqa: BLE001 — ends the stream now
            failure.append(error)
            with contextlib.suppress(grpc.aio.AbortError):
                await abort_with(context, error)

    def finished(group_id: int, size: int, task: asyncio.Task) -> None:
        if tasks.get(group_id) is task:
            del tasks[group_id]
        handling.give(size)

    async def go_away() -> None:
        await draining.wait()
        async with writing:
            await context.write(frame(GO_AWAY, b""))

    farewell = loop.create_task(go_away())
    try:
        await context.send_initial_metadata((CANCELS,))
        while (message := await context.read()) is not grpc.aio.EOF:
            if failure:
                break
            if (given_up := cancelled_id(message)) is not None:
                if (task := tasks.get(given_up)) is not None:
                    cancel(task)
                continue
            try:
                group_id, body, _ = unframe(message)
            except ValueError as malformed:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(malformed))
            task = tasks[group_id] = loop.create_task(answer(group_id, body))
            handling.take(len(body))
            # A done callback runs even for a task cancelled before it began.
            task.add_done_callback(functools.partial(finished, group_id, len(body)))
            if handling.full:
                await handling.room()
        if tasks:
            await asyncio.gather(*list(tasks.values()), return_exceptions=True)
        if failure:
            raise failure[0]
    finally:
        farewell.cancel()
        for task in list(tasks.values()):
            cancel(task)


SERVICE = "meshserve.v1.GroupInference"


def group_handler(handle: Handle, draining: asyncio.Event,
                  more: dict[str, grpc.RpcMethodHandler] | None = None,
                  max_handling: int = MAX_HANDLING) -> grpc.GenericRpcHandler:
    """`GroupInference` served by `handle` over raw bytes (gRPC parses nothing; `handle`
    decides what to read): `Stream`, and `Infer` (one group in one call, for debugging and
    fuzzing), holding at most `max_handling` bytes of groups between them; `more` adds the
    service's other methods."""
    handling = Handling(max_handling)

    async def stream(request_iterator, context) -> None:
        await serve_stream(context, handle, draining, handling)

    async def infer(request: bytes, context) -> bytes:
        if handling.full:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, handling.refusal())
        handling.take(len(request))
        try:
            return await handle(request, None)
        finally:
            handling.give(len(request))

    return grpc.method_handlers_generic_handler(SERVICE, {
        STREAM: grpc.stream_stream_rpc_method_handler(stream),
        INFER: grpc.unary_unary_rpc_method_handler(infer),
        **(more or {})})


def start_stream(channel, metadata=None) -> grpc.aio.StreamStreamCall:
    """A new `GroupInference/Stream` call on `channel` (a grpc.aio channel, or the hops' own
    `Http2Channel`; with `metadata`, e.g. a version pin), carrying raw bytes. Each message is
    written as a list of pieces: the hops' own client sends them as they are, a grpc.aio
    channel joins them."""
    join = b"".join if isinstance(channel, grpc.aio.Channel) else None
    return channel.stream_stream(f"/{SERVICE}/{STREAM}", request_serializer=join)(
        metadata=metadata)
