"""Pure decision logic of the dynamic batcher: queue order, batch forming, delays, expiry.

Nothing here reads a clock or does I/O: the caller passes the monotonic time as `now`
(float seconds) and carries out the decisions (`Send` / `Wait`) itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

from meshserve.common.errors import InvalidArgument, ResourceExhausted
from meshserve.common.priority import priority_level

_US_PER_S = 1e6  # exact division keeps e.g. 1000 us == 0.001 s
DEFAULT_RETRY_AFTER = 0.05  # a refusal's hint when the caller gives none


@dataclass(frozen=True)
class BatchingPolicy:
    """How one model's requests are queued and grouped into batches."""

    max_batch_size: int  # cap on ROWS in a batch; 0 = no batch dimension, one request per batch
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0  # 0 = send as soon as a replica is idle (work-conserving)
    max_queue_size: int = 0  # max queued REQUESTS; 0 = unbounded
    default_timeout_us: int = 0  # queue timeout per request; 0 = none
    priority_levels: int = 0  # 0 or 1 = a single level
    default_priority_level: int = 0  # used when a request gives priority 0
    max_queue_bytes: int = 0  # payload bytes queued + in flight; 0 = unbounded

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise InvalidArgument(f"max_batch_size must be >= 0, got {self.max_batch_size}")
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                raise InvalidArgument(
                    f"preferred_batch_size {size} must be between 1 and "
                    f"max_batch_size {self.max_batch_size}"
                )

    @classmethod
    def from_config(cls, config: Any) -> BatchingPolicy:
        """The policy of a `ModelConfig` message.

        A config without a `dynamic_batching` section still gets batched, work-conservingly:
        delay 0, no preferred sizes, unbounded queue, no timeout, a single priority level.
        So an idle replica always receives everything queued (up to `max_batch_size` rows).
        """
        if not config.HasField("dynamic_batching"):
            return cls(max_batch_size=config.max_batch_size)
        dynamic = config.dynamic_batching
        queue_policy = dynamic.default_queue_policy
        return cls(
            max_batch_size=config.max_batch_size,
            preferred_batch_sizes=tuple(dynamic.preferred_batch_size),
            max_queue_delay_us=dynamic.max_queue_delay_microseconds,
            max_queue_size=queue_policy.max_queue_size,
            default_timeout_us=queue_policy.default_timeout_microseconds,
            priority_levels=dynamic.priority_levels,
            default_priority_level=dynamic.default_priority_level,
        )

    @property
    def levels(self) -> int:
        """Number of priority levels (at least 1)."""
        return max(self.priority_levels, 1)

    def level_of(self, priority: int) -> int:
        """The queue level (1 = most urgent) of a request's priority (`priority_level`)."""
        return priority_level(priority, self.priority_levels, self.default_priority_level)


@dataclass
class Pending:
    """One queued request as the policy sees it."""

    key: Hashable  # shape signature: requests share a batch only when keys are equal
    rows: int  # batch-dimension size (1 when max_batch_size == 0)
    enqueued: float  # monotonic seconds
    deadline: float | None  # monotonic seconds; None = none
    priority: int = 0  # as given; 0 = policy default. Lower number = more urgent (1 is highest)
    payload: Any = None  # opaque to the policy
    size: int = 0  # payload bytes, counted against `max_queue_bytes`


class QueueFull(ResourceExhausted):
    """A refusal or an eviction by a full queue; `reason` names what was full
    ("queue_full": requests, "bytes": bytes, "priority": evicted for a more urgent one)."""

    def __init__(self, message: str, reason: str, retry_after: float) -> None:
        super().__init__(message, retry_after)
        self.reason = reason


@dataclass(frozen=True)
class Shed:
    """A queued entry evicted to admit a more urgent one, and the error to answer it with."""

    entry: Pending
    error: QueueFull


@dataclass(frozen=True)
class Send:
    """Take `count` entries from the front of the queue and run them as one batch."""

    count: int


@dataclass(frozen=True)
class Wait:
    """Decide again at `until` (monotonic seconds); None = at the next arrival or free replica."""

    until: float | None


@dataclass(frozen=True)
class _Candidate:
    entries: tuple[Pending, ...]
    rows: int
    closed: bool


class BatchQueue:
    """The queue of one model version: priority levels, FIFO within a level."""

    def __init__(self, policy: BatchingPolicy, label: str = "") -> None:
        self.policy = policy
        self.label = label
        self._levels: list[deque[Pending]] = [deque() for _ in range(policy.levels)]
        self._count = 0
        self._rows = 0
        self._bytes = 0  # queued + taken and not yet released

    def __len__(self) -> int:
        return self._count

    @property
    def rows(self) -> int:
        """Rows queued, over all requests."""
        return self._rows

    @property
    def bytes(self) -> int:
        """Payload bytes held: queued, and taken but not yet released."""
        return self._bytes

    def add(self, entry: Pending,
            retry_after: Callable[[], float] = lambda: DEFAULT_RETRY_AFTER) -> list[Shed]:
        """Queue `entry`, applying the queue timeout and clamping its priority; returns the
        entries shed to make room for it (each to be answered with its error).

        When the queue is full (`max_queue_size` requests or `max_queue_bytes` bytes), the
        newest entries of less urgent levels than the arrival's are shed, least urgent level
        first, until it fits; when shedding them all would not make room, nothing is shed and
        the arrival is refused with QueueFull. InvalidArgument when the entry's rows exceed
        `max_batch_size` (it could never be sent). Refusals carry `retry_after()` seconds
        (worked out only when something is refused or shed).
        """
        self._check_rows(entry)
        level = self.policy.level_of(entry.priority)
        victims = self._victims(level, entry.size, retry_after)
        shed = [Shed(victim, self._shed_error(retry_after())) for victim in victims]
        if victims:
            for victim in victims:  # the newest first: each is the last of its level
                self._levels[victim.priority - 1].pop()
            self._forget(victims)
        timeout_us = self.policy.default_timeout_us
        if timeout_us > 0:
            entry.deadline = _earliest(entry.deadline, entry.enqueued + timeout_us / _US_PER_S)
        entry.priority = level
        self._levels[level - 1].append(entry)
        self._count += 1
        self._rows += entry.rows
        self._bytes += entry.size
        return shed

    def release(self, entries: list[Pending]) -> None:
        """Entries taken earlier were answered: their bytes leave the budget."""
        self._bytes -= sum(entry.size for entry in entries)


    def expire(self, now: float) -> list[Pending]:
        """Remove and return every entry whose deadline is at or before `now`."""
        expired: list[Pending] = []
        for index, level in enumerate(self._levels):
            if not any(_is_expired(entry, now) for entry in level):
                continue
            kept: deque[Pending] = deque()
            for entry in level:
                (expired if _is_expired(entry, now) else kept).append(entry)
            self._levels[index] = kept
        self._forget(expired)
        return expired

    def _forget(self, removed: list[Pending]) -> None:
        """Removed from the queue and never sent: rows, count and bytes go."""
        self._count -= len(removed)
        self._rows -= sum(entry.rows for entry in removed)
        self._bytes -= sum(entry.size for entry in removed)

    def decide(self, now: float, idle_replicas: int) -> Send | Wait:
        """What to do at `now`; assumes `expire(now)` was just called."""
        if not self._count:
            return Wait(None)
        nearest = self._nearest_deadline()
        if idle_replicas <= 0:
            return Wait(nearest)
        candidate = self._candidate()
        preferred = self._largest_preferred(candidate)
        if preferred:
            return Send(preferred)
        if candidate.closed:
            return Send(len(candidate.entries))
        send_at = min(entry.enqueued for entry in candidate.entries)
        send_at += self.policy.max_queue_delay_us / _US_PER_S
        if now >= send_at:
            return Send(len(candidate.entries))
        return Wait(_earliest(send_at, nearest))

    def take(self, count: int) -> list[Pending]:
        """Pop the first `count` entries in queue order."""
        taken: list[Pending] = []
        for level in self._levels:
            while level and len(taken) < count:
                taken.append(level.popleft())
        self._count -= len(taken)
        self._rows -= sum(entry.rows for entry in taken)
        return taken

    def _in_order(self) -> Iterator[Pending]:
        for level in self._levels:
            yield from level

    def _candidate(self) -> _Candidate:
        """The batch at the front of the queue, and whether it can grow no further."""
        entries = self._in_order()
        first = next(entries)
        cap = self.policy.max_batch_size
        if cap == 0:
            return _Candidate((first,), first.rows, closed=True)
        taken, rows = [first], first.rows
        for entry in entries:
            if entry.key != first.key or rows + entry.rows > cap:
                return _Candidate(tuple(taken), rows, closed=True)
            taken.append(entry)
            rows += entry.rows
        return _Candidate(tuple(taken), rows, closed=rows >= cap)

    def _largest_preferred(self, candidate: _Candidate) -> int:
        """Entries in the longest front part of the candidate whose rows make a preferred
        batch size (Triton: the largest preferred size that can be formed goes at once);
        0 when none can be formed."""
        preferred = self.policy.preferred_batch_sizes
        best, rows = 0, 0
        for count, entry in enumerate(candidate.entries, start=1):
            rows += entry.rows
            if rows in preferred:
                best = count
        return best

    def _nearest_deadline(self) -> float | None:
        deadlines = [e.deadline for e in self._in_order() if e.deadline is not None]
        return min(deadlines, default=None)

    def _victims(self, level: int, size: int,
                 retry_after: Callable[[], float]) -> list[Pending]:
        """The entries to shed so that an arrival of `size` bytes at `level` fits: the newest
        of the least urgent level first, never one as urgent as the arrival. Raises QueueFull
        when even shedding all of those would not make room."""
        max_count, max_bytes = self.policy.max_queue_size, self.policy.max_queue_bytes
        if max_bytes > 0 and size > max_bytes:
            raise QueueFull(f"request of {size} bytes for {self._name()} exceeds "
                            f"max_queue_bytes {max_bytes}", "bytes", retry_after())
        count, held = self._count, self._bytes
        victims: list[Pending] = []
        candidates = None  # made only when the queue has no room (rarely)
        while True:
            over_count = max_count > 0 and count + 1 > max_count
            over_bytes = max_bytes > 0 and held + size > max_bytes
            if not (over_count or over_bytes):
                return victims
            if candidates is None:
                candidates = (entry for queued in reversed(self._levels[level:])
                              for entry in reversed(queued))
            victim = next(candidates, None)
            if victim is None:
                reason = "queue_full" if over_count else "bytes"
                limit = (f"max_queue_size {max_count}" if over_count
                         else f"max_queue_bytes {max_bytes}")
                raise QueueFull(f"{self._name()} is full ({limit}; {self._occupancy()})",
                                reason, retry_after())
            victims.append(victim)
            count -= 1
            held -= victim.size

    def _shed_error(self, retry_after: float) -> QueueFull:
        return QueueFull(f"shed: {self._name()} full ({self._occupancy()}) and a more urgent "
                         "request arrived", "priority", retry_after)

    def _occupancy(self) -> str:
        return f"{self._count} requests / {self._bytes} bytes"

    def _check_rows(self, entry: Pending) -> None:
        cap = self.policy.max_batch_size
        if cap > 0 and not 1 <= entry.rows <= cap:
            raise InvalidArgument(
                f"request of {entry.rows} rows for {self._name()} must have between 1 "
                f"and max_batch_size {cap} rows"
            )

    def _name(self) -> str:
        return f"queue of {self.label}" if self.label else "queue"


def _is_expired(entry: Pending, now: float) -> bool:
    return entry.deadline is not None and entry.deadline <= now


def _earliest(a: float | None, b: float | None) -> float | None:
    """The earlier of two optional times; None means no time."""
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
