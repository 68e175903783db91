"""Group forwarding: the internal hop's hot path.

A hop keeps one group waiting per upstream (and version pin) on its long-lived stream. While a
group waits for its first answer, new requests wait; when it is answered (wholly, or in part as
its first batch finishes, or by the batcher's word that compute has taken all of it),
everything that arrived meanwhile leaves as the next group. Idle, a request leaves at once as a
group of one; busy, groups grow by themselves, so gRPC's per-message cost is paid per group,
not per request. Under load a group may linger a moment for the requests its hop expects
back (see `GroupForwarder`), so that they travel together rather than in turns.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import grpc

from meshserve.common import wire
from meshserve.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ServingError,
    Unavailable,
    from_code,
)
from meshserve.common.streams import GroupStream, Handle, StreamBroken
from meshserve.protocol.groups_pb2 import GroupItem, InferGroup, InferGroupResult, ItemResult
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest


class Entry(NamedTuple):
    """A request to forward: what its group item will carry (the request is serialized once,
    as the group is built), its deadline, and its tensors' bytes (what validation counted)."""

    request: ModelInferRequest
    request_id: str
    deadline: float | None  # absolute, on this process's monotonic clock (None: none)
    priority: int = 0
    traceparent: str = ""
    size: int = 0
    # Told of each answer with more to come (a decoupled model's); None: such answers are
    # dropped, and the request gets its last.
    partial: Callable[[ItemResult], None] | None = None

# Sends a serialized InferGroup and returns its (last) answer, telling the callback of early
# partial answers first (raises StreamBroken or TimeoutError).
GroupCall = Callable[[list[bytes], float | None, Callable[[InferGroupResult], None]],
                     Awaitable[InferGroupResult]]
# Told of each group call: (requests in the group, status name of the call: "OK" or a code).
GroupObserver = Callable[[int, str], None]

CODE_NUMBER = {status.name: status.value[0] for status in grpc.StatusCode}
CODE_NAME = {number: name for name, number in CODE_NUMBER.items()}
OK = 0
RESOURCE_EXHAUSTED = CODE_NUMBER["RESOURCE_EXHAUSTED"]

# Groups linger only when this many requests are expected: under a light load a request
# leaving at once matters more than the size of its group.
LINGER_FROM = 8

# A group's requests' tensors together, at most (one request larger goes alone): half of what
# one message between the hops may carry, the rest of each request and the group's own keys
# far under the other half. Many large requests at once otherwise made one group past the
# limit, and every request in it failed.
MAX_GROUP_BYTES = 32 << 20


def error_result(error: ServingError) -> ItemResult:
    return ItemResult(code=CODE_NUMBER[error.code], message=error.message)


def raise_for(result: ItemResult) -> None:
    """Raise the domain error an item result carries, if any."""
    if result.code != OK:
        raise from_code(CODE_NAME.get(result.code, "UNKNOWN"), result.message)


def left_code(deadline: float | None, now: float) -> str:
    """The status of a call whose caller left before its answer: DEADLINE_EXCEEDED when its
    deadline had passed (10 ms' slack: the time left is read a moment before the arrival it
    is added to), else CANCELLED."""
    return "DEADLINE_EXCEEDED" if deadline is not None and now >= deadline - 0.01 else "CANCELLED"


def deadline_of(timeout_us: int, arrived: float,
                remaining: float | None = None) -> float | None:
    """When a request that `arrived` must be answered: `timeout_us` later (0: no bound), or
    sooner when its call has only `remaining` seconds left (None: no deadline)."""
    deadline = arrived + timeout_us / 1e6 if timeout_us else None
    if remaining is None:
        return deadline
    return arrived + remaining if deadline is None else min(deadline, arrived + remaining)


def failure_result(code: grpc.StatusCode, details: str, upstream: str) -> ItemResult:
    """The answer for a request whose upstream call failed with `code`."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return error_result(DeadlineExceeded("deadline exceeded before the model answered"))
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return error_result(Unavailable(f"{upstream} unavailable: {details}"))
    return ItemResult(code=code.value[0], message=details or code.name)


def rpc_error_result(error: grpc.aio.AioRpcError, upstream: str) -> ItemResult:
    return failure_result(error.code(), error.details(), upstream)


def error_group(count: int, result: ItemResult) -> bytes:
    """A serialized InferGroupResult answering each of `count` items with `result`."""
    return InferGroupResult(results=[result] * count).SerializeToString()


async def one_item(handle: Handle, request, remaining: float | None) -> list[ItemResult]:
    """A debugging `ModelInfer` on an internal service: the request as a group of one, through
    the service's own group handler."""
    timeout_us = int(remaining * 1e6) if remaining else 0
    group = InferGroup(model_name=request.model_name, version=request.model_version,
                       timeout_us=timeout_us,
                       items=[GroupItem(request=request, timeout_us=timeout_us)])
    return list(InferGroupResult.FromString(
        await handle(group.SerializeToString(), None)).results)


def status_of_result(result: ItemResult) -> grpc.StatusCode:
    return grpc.StatusCode[CODE_NAME.get(result.code, "UNKNOWN")]


def over_stream(stream: GroupStream) -> GroupCall:
    """A GroupCall that sends on `stream` (one retry on a fresh stream when it broke)."""

    async def call(group: list[bytes], timeout: float | None,
                   early: Callable[[InferGroupResult], None] | None = None) -> InferGroupResult:
        async def heard(partial: bytes) -> None:
            early(InferGroupResult.FromString(partial))

        return InferGroupResult.FromString(await stream.send(
            group, timeout, early=None if early is None else heard))

    return call


class _Parcels:
    """The parcels of one group and their results, each parcel answered as soon as its last
    result is in (an early answer may complete some before the group's last answer)."""

    def __init__(self, parcels: list[tuple[list[Entry], asyncio.Future]]) -> None:
        self.parcels = parcels
        self.results: list[list[ItemResult | None]] = [[None] * len(e) for e, _ in parcels]
        self.missing = [len(entries) for entries, _ in parcels]
        self.sent: list[tuple[int, int]] = []  # (parcel, entry) of each item in the group

    def place(self, p: int, j: int, result: ItemResult) -> None:
        if self.results[p][j] is not None:
            return
        if result.more:
            partial = self.parcels[p][0][j].partial
            if partial is not None:
                partial(result)
            return
        self.results[p][j] = result
        self.missing[p] -= 1
        future = self.parcels[p][1]
        if not self.missing[p] and not future.done():
            future.set_result(self.results[p])

    def answer(self, reply: InferGroupResult) -> None:
        """Place an answer's results: those of the listed positions, or every item's."""
        positions = list(reply.items) if reply.items else range(len(self.sent))
        if len(positions) != len(reply.results) or (
                not reply.items and len(reply.results) != len(self.sent)):
            raise ValueError(f"upstream answered {len(reply.results)} results for "
                             f"{len(positions) if reply.items else len(self.sent)} items")
        for position, result in zip(positions, reply.results):
            if position >= len(self.sent):
                raise ValueError(f"upstream answered item {position} of {len(self.sent)}")
            self.place(*self.sent[position], result)

    def answer_all(self, result: ItemResult) -> None:
        for p, j in self.sent:
            self.place(p, j, result)


# Field keys of a group written by hand (`serialized_group`).
_ITEM = wire.tag(InferGroup.ITEMS_FIELD_NUMBER)
_REQUEST = wire.tag(GroupItem.REQUEST_FIELD_NUMBER)


def serialized_group(head: InferGroup,
                     items: list[tuple[list[bytes], GroupItem]]) -> list[bytes]:
    """A serialized InferGroup, in pieces (joined, they are its bytes: a group stream sends
    them as they are): `head`'s fields and `items`, each a serialized request (in pieces too)
    and its item's other fields. Built as a message and serialized, a group copies every
    payload three more times (16 cnn requests: 1,100-1,200 against 110 µs in-process)."""
    pieces = [head.SerializeToString()]
    for request, item in items:
        rest = item.SerializeToString()
        size = sum(map(len, request))
        field = _REQUEST + wire.varint(size)
        pieces += (_ITEM, wire.varint(len(field) + size + len(rest)), field, *request, rest)
    return pieces


def not_a_group(error: Exception) -> InvalidArgument:
    """The refusal of a group whose bytes do not parse (`error` says where)."""
    return InvalidArgument(f"group is not a valid InferGroup message: {error}")


class GroupHead(NamedTuple):
    """What a group says of itself beside its items, and how many items it holds."""

    model_name: str
    version: str
    timeout_us: int
    items: int

    @classmethod
    def of(cls, group: InferGroup) -> "GroupHead":
        return cls(group.model_name, group.version, group.timeout_us, len(group.items))

    @classmethod
    def read(cls, body: bytes | memoryview) -> "GroupHead":
        """The head of the serialized InferGroup `body`, read without parsing its items (a
        cnn group of 16 requests parsed whole: 21-22 µs in-process, warm, and its 780 KB
        copied twice). ValueError where `body` is not an InferGroup's wire format; the items
        themselves are not looked into. As a parser does, a field of the wrong wire type is
        one it does not know."""
        model_name = version = ""
        timeout_us = items = position = 0
        size = len(body)
        try:
            while position < size:
                key = body[position]
                if key & 7 != wire.LENGTH_DELIMITED or key > 0x7F:
                    number, kind, start, position = wire.read_field(body, position)
                    if number == _TIMEOUT_US and kind == wire.VARINT:
                        timeout_us = start
                    continue
                length = body[position + 1]  # a length under 16 KiB read here, as most are
                if length < 0x80:
                    start = position + 2
                elif (more := body[position + 2]) < 0x80:
                    start, length = position + 3, length & 0x7F | more << 7
                else:
                    length, start = wire.read_varint(body, position + 1)
                position = start + length
                number = key >> 3
                if number == _ITEMS:
                    items += 1
                elif number == _MODEL_NAME:
                    model_name = str(body[start:position], "utf-8")
                elif number == _VERSION:
                    version = str(body[start:position], "utf-8")
        except IndexError:
            raise ValueError("a field is cut short") from None
        if position > size:
            raise ValueError("the last field runs past the group's end")
        return cls(model_name, version, timeout_us, items)


_ITEMS = InferGroup.ITEMS_FIELD_NUMBER
_MODEL_NAME = InferGroup.MODEL_NAME_FIELD_NUMBER
_VERSION = InferGroup.VERSION_FIELD_NUMBER
_TIMEOUT_US = InferGroup.TIMEOUT_US_FIELD_NUMBER


def build_group(model_name: str, version: str, parcels: list[list[Entry]], now: float,
                sent: list[tuple[int, int]]) -> tuple[list[bytes], list[tuple[int, int]],
                                                      float | None]:
    """The serialized InferGroup (in pieces) that goes on the wire for `parcels` at monotonic
    time `now`: each item with its remaining time, and the group's timeout the longest of
    them (None when an item has no deadline). Appends the (parcel, entry) of each item sent
    to `sent`; returns the group, the (parcel, entry) of the items already past their
    deadline, and the longest time."""
    items = []
    expired = []
    longest: float | None = 0.0
    for p, entries in enumerate(parcels):
        for j, entry in enumerate(entries):
            deadline = entry.deadline
            if deadline is None:
                timeout_us = 0
                longest = None
            else:
                remaining = deadline - now
                if remaining <= 0:
                    expired.append((p, j))
                    continue
                timeout_us = int(remaining * 1e6)
                if longest is not None:
                    longest = max(longest, remaining)
            sent.append((p, j))
            items.append(([entry.request.SerializeToString()], GroupItem(
                request_id=entry.request_id, priority=entry.priority,
                traceparent=entry.traceparent, timeout_us=timeout_us)))
    head = InferGroup(model_name=model_name, version=version,
                      timeout_us=int(longest * 1e6) if longest else 0)
    return serialized_group(head, items), expired, longest


def expiry(entries: list[Entry]) -> float | None:
    """When every one of `entries` is past its deadline (None: one has none)."""
    if len(entries) == 1:  # a request's parcel: the common case, on the hot path
        return entries[0].deadline
    deadlines = [entry.deadline for entry in entries]
    return None if None in deadlines else max(deadlines)


def size_of(entries: list[Entry]) -> int:
    return entries[0].size if len(entries) == 1 else sum(entry.size for entry in entries)


class GroupForwarder:
    """Coalesces entries for one model into groups, one group waiting per upstream.

    A group waits from when it is sent until its first answer: its last one, or an early
    answer to part of it (a batch that finished while others of the group still queue, or
    refusals), or one without results (compute took the whole group and has room for no
    more). Then the entries that arrived meanwhile leave as the next group, so a model
    whose batches are slow always has the next requests queued at its batcher.

    A group answered early in part with RESOURCE_EXHAUSTED (its batcher's queue is full)
    leaves the forwarder saturated until the group's last answer: entries arriving meanwhile
    get that refusal at once instead of waiting to be sent to a full queue.

    `linger` (seconds, 0: never): when a group is first answered, the entries that wait then
    and those its answer let go (each caller sends again once answered) are the entries
    expected next. When LINGER_FROM or more are, the next group, if its turn comes within a
    round trip of that answer, waits until they are all there, for at most `linger` and the
    last round trip. Under a steady load of N callers the requests then travel as one group
    of N. Without it they split into groups that take turns and stay so (at 8 callers, two of
    4), and each group costs every hop about as much as a group of N.

    `waiting` counts the entries that wait for the next group, and `round_trip` is how long
    the last group took to be answered (seconds): about when those entries will have left."""

    def __init__(self, call: GroupCall, model_name: str, upstream: str, *, version: str = "",
                 max_group: int = 512, max_group_bytes: int = MAX_GROUP_BYTES,
                 max_in_flight: int = 1, linger: float = 0.0,
                 observe: GroupObserver | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._call = call
        self._clock = clock
        self._observe = observe
        self._model_name = model_name
        self._version = version
        self._upstream = upstream
        self._max_group = max_group
        self._max_group_bytes = max_group_bytes
        self._max_in_flight = max_in_flight
        self._linger = linger
        self._pending: list[tuple[list[Entry], asyncio.Future]] = []
        self._in_flight = 0  # groups sent and not answered at all yet
        self.saturated: ItemResult | None = None
        self.waiting = 0
        self.round_trip = 0.0
        self._expected = 0  # entries expected next, at the last group's (first) answer
        self._answered_at = float("-inf")  # when the last group was (first) answered
        self._enough: asyncio.Future | None = None  # while lingering: done once all expected wait
        self._sweep: asyncio.TimerHandle | None = None  # at the earliest deadline of a parcel
        self._sweep_at = float("inf")
        self._flying: dict[_Parcels, asyncio.Task] = {}  # each group sent, and its sender
        self._leaving = False  # callers left: `_left` is due

    async def forward(self, entries: list[Entry]) -> list[ItemResult]:
        """Send `entries` with whatever else is waiting; one result per entry, in order."""
        if self.saturated is not None:
            return [self.saturated] * len(entries)
        future = asyncio.get_running_loop().create_future()
        self._pending.append((entries, future))
        self.waiting += len(entries)
        enough = self._enough
        if enough is not None and self.waiting >= self._expected and not enough.done():
            enough.set_result(None)
        expires = expiry(entries)
        if expires is not None and expires < self._sweep_at:
            self._sweep_from(expires)
        self._next()
        try:
            return await future
        except asyncio.CancelledError:
            if not self._leaving:  # one look for all the callers that leave at once
                self._leaving = True
                asyncio.get_running_loop().call_soon(self._left)
            raise

    def _left(self) -> None:
        """Callers were cancelled (they left: their calls were cancelled, or their deadlines
        passed): their parcels are not sent, and a group whose every parcel is answered or
        left is given up (the upstream cancels its requests too)."""
        self._leaving = False
        left = [entries for entries, future in self._pending if future.cancelled()]
        if left:
            self._pending[:] = [parcel for parcel in self._pending if not parcel[1].cancelled()]
            self.waiting -= sum(map(len, left))
        for parcels, sender in list(self._flying.items()):
            futures = [future for _, future in parcels.parcels]
            if all(f.done() for f in futures) and any(f.cancelled() for f in futures):
                sender.cancel()

    def _sweep_from(self, when: float) -> None:
        """Look for parcels past their deadline at `when` (one timer, at the earliest)."""
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_at = when
        self._sweep = asyncio.get_running_loop().call_later(max(when - self._clock(), 0.0),
                                                            self._answer_expired)

    def _answer_expired(self) -> None:
        """Answer the waiting parcels whose every request is past its deadline, without
        waiting for their group's turn (under overload the group in flight may take seconds):
        `timeout` bounds a request end to end."""
        self._sweep, self._sweep_at = None, float("inf")
        now, kept, soonest = self._clock(), [], float("inf")
        for parcel in self._pending:
            entries, future = parcel
            expires = expiry(entries)
            if expires is None or expires > now:
                kept.append(parcel)
                if expires is not None:
                    soonest = min(soonest, expires)
                continue
            self.waiting -= len(entries)
            if not future.done():
                future.set_result([error_result(DeadlineExceeded(
                    f"deadline exceeded before the request left the {self._upstream} "
                    "queue"))] * len(entries))
        self._pending[:] = kept
        if soonest < float("inf"):
            self._sweep_from(soonest)

    def _next(self) -> None:
        """Start the next group when entries wait and a group may be sent."""
        if self._pending and self._in_flight < self._max_in_flight:
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._send_next())

    def _take(self) -> list[tuple[list[Entry], asyncio.Future]]:
        """The parcels of the next group, off the pending list: at most `max_group` requests
        and `max_group_bytes` of their tensors (the first parcel whatever its size)."""
        taken, items, size = 0, 0, 0
        for entries, _ in self._pending:
            size += size_of(entries)
            if taken and (items + len(entries) > self._max_group
                          or size > self._max_group_bytes):
                break
            taken += 1
            items += len(entries)
        parcels = self._pending[:taken]
        del self._pending[:taken]
        self.waiting -= items
        return parcels

    async def _send_next(self) -> None:
        """Send what waits now (after lingering, under load) as one group; it frees its place
        at its first answer."""
        waiting = True

        def answered(let_go: int) -> None:
            """The group's first answer, which answered `let_go` of its entries."""
            nonlocal waiting
            if waiting:
                waiting = False
                self._in_flight -= 1
                self._answered_at = self._clock()
                self._expected = let_go + self.waiting
                self._next()

        await self._linger_for_expected()
        parcels = _Parcels(self._take())
        self._flying[parcels] = asyncio.current_task()
        try:
            await self._send(parcels, answered)
        except Exception as error:  # noqa: BLE001 — every waiter must hear of it
            for _, future in parcels.parcels:
                if not future.done():
                    future.set_exception(error)
        finally:
            del self._flying[parcels]
            answered(sum(len(entries) for entries, _ in parcels.parcels))

    async def _linger_for_expected(self) -> None:
        """Under load, wait until the entries expected wait (see the class)."""
        expected = self._expected
        if (not self._linger or expected < LINGER_FROM or self.waiting >= expected
                or self._clock() - self._answered_at > self.round_trip):
            return
        enough = self._enough = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait((enough,), timeout=min(self._linger, self.round_trip))
        finally:
            self._enough = None

    async def _send(self, parcels: _Parcels, answered: Callable[[int], None]) -> None:
        started = self._clock()
        group, expired, longest = build_group(self._model_name, self._version,
                                              [entries for entries, _ in parcels.parcels],
                                              started, parcels.sent)
        for p, j in expired:
            parcels.place(p, j, error_result(DeadlineExceeded(
                f"deadline exceeded before the request left the {self._upstream} queue")))
        if not parcels.sent:
            return

        refusal: ItemResult | None = None

        def early(partial: InferGroupResult) -> None:
            nonlocal refusal
            if partial.results:  # none: the upstream has taken the whole group off its queue
                parcels.answer(partial)
            finished = 0
            for result in partial.results:
                if result.code == RESOURCE_EXHAUSTED:
                    self.saturated = refusal = result
                finished += not result.more
            answered(finished)

        code = "OK"
        try:
            parcels.answer(await self._call(group, longest, early))
        except StreamBroken as broken:
            code = broken.code.name
            parcels.answer_all(failure_result(broken.code, broken.details, self._upstream))
        except TimeoutError:
            code = grpc.StatusCode.DEADLINE_EXCEEDED.name
            parcels.answer_all(failure_result(grpc.StatusCode.DEADLINE_EXCEEDED, "",
                                              self._upstream))
        except asyncio.CancelledError:  # every caller left (`_left`)
            code = grpc.StatusCode.CANCELLED.name
            raise
        finally:
            if refusal is not None and self.saturated is refusal:
                self.saturated = None
            self.round_trip = self._clock() - started
            if self._observe is not None:
                self._observe(len(parcels.sent), code)
