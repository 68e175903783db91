"""Pure decision logic of the dynamic batcher: queue order, batch forming, delays, expiry.

Nothing here reads a clock or does I/O: the caller passes the monotonic time as `now`
(float seconds) and carries out the decisions (`Send` / `Wait`) itself.

The rules are those of Triton's dynamic batcher (`DynamicBatchScheduler::GetDynamicBatch`,
`PriorityQueue`): a batch is the front of the queue while its requests' shapes agree and
their rows fit `max_batch_size`; the largest preferred size it can make goes at once, and a
batch that would pass the largest preferred size goes at once with what fits under it; past
`max_queue_delay_microseconds` (counted from its oldest request) everything that fits goes.
Each priority level keeps its own queue policy: a request waiting past its level's timeout is
refused (REJECT) or waits behind the level's others (DELAY), and never bounds the compute.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

from meshserve.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from meshserve.common.priority import priority_level
from meshserve.protocol.model_config_pb2 import ModelQueuePolicy

_US_PER_S = 1e6  # exact division keeps e.g. 1000 us == 0.001 s
DEFAULT_RETRY_AFTER = 0.05  # a refusal's hint when the caller gives none


@dataclass(frozen=True)
class QueuePolicy:
    """One priority level's queue policy (Triton's ModelQueuePolicy): how many requests the
    level holds, and how long one waits for a batch before its timeout action applies."""

    max_queue_size: int = 0  # requests of the level; 0 = unbounded
    timeout_us: int = 0  # default_timeout_microseconds; 0 = none
    delay: bool = False  # timeout_action DELAY: past it, behind the level's others, never refused

    @classmethod
    def of(cls, message: Any) -> QueuePolicy:
        """The policy of a `ModelQueuePolicy` message."""
        return cls(message.max_queue_size, message.default_timeout_microseconds,
                   message.timeout_action == ModelQueuePolicy.DELAY)


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
    default_delays: bool = False  # the default queue policy's timeout_action is DELAY
    # priority_queue_policy: (level, its policy), by level; the other levels follow the default
    level_policies: tuple[tuple[int, QueuePolicy], ...] = ()
    # Requests share a batch (the model has `dynamic_batching`); without it each request is a
    # batch of its own, as Triton's default scheduler runs it.
    merges: bool = True

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

        A config without a `dynamic_batching` section runs each request as a batch of its
        own, as soon as a replica is idle: no delay, unbounded queue, no timeout, a single
        priority level. A model that never asked to have requests merged may not be one
        whose rows are independent of each other.
        """
        if not config.HasField("dynamic_batching"):
            return cls(max_batch_size=config.max_batch_size, merges=False)
        dynamic = config.dynamic_batching
        default = QueuePolicy.of(dynamic.default_queue_policy)
        return cls(
            max_batch_size=config.max_batch_size,
            preferred_batch_sizes=tuple(dynamic.preferred_batch_size),
            max_queue_delay_us=dynamic.max_queue_delay_microseconds,
            max_queue_size=default.max_queue_size,
            default_timeout_us=default.timeout_us,
            priority_levels=dynamic.priority_levels,
            default_priority_level=dynamic.default_priority_level,
            default_delays=default.delay,
            level_policies=tuple(sorted((level, QueuePolicy.of(policy)) for level, policy
                                        in dynamic.priority_queue_policy.items())),
        )

    @property
    def levels(self) -> int:
        """Number of priority levels (at least 1)."""
        return max(self.priority_levels, 1)

    def level_of(self, priority: int) -> int:
        """The queue level (1 = most urgent) of a request's priority (`priority_level`)."""
        return priority_level(priority, self.priority_levels, self.default_priority_level)

    @property
    def default_queue_policy(self) -> QueuePolicy:
        """The queue policy of every level `level_policies` does not name."""
        return QueuePolicy(self.max_queue_size, self.default_timeout_us, self.default_delays)


@dataclass
class Pending:
    """One queued request as the policy sees it."""

    key: Hashable  # shape signature: requests share a batch only when keys are equal
    rows: int  # batch-dimension size (1 when max_batch_size == 0)
    enqueued: float  # monotonic seconds
    deadline: float | None  # the caller's, monotonic seconds; None = none
    priority: int = 0  # as given; 0 = policy default. Lower number = more urgent (1 is highest)
    payload: Any = None  # opaque to the policy
    size: int = 0  # payload bytes, counted against `max_queue_bytes`
    # When its level's queue timeout passes while it waits (set by `add`; None: none, or
    # passed under DELAY). It bounds the wait for a batch only, never the compute.
    timeout_at: float | None = None


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
    """The queue of one model version: priority levels, FIFO within a level (a level's
    requests past a DELAY timeout behind its others)."""

    def __init__(self, policy: BatchingPolicy, label: str = "") -> None:
        self.policy = policy
        self.label = label
        levels = policy.levels
        self._levels: list[deque[Pending]] = [deque() for _ in range(levels)]
        self._delayed: list[deque[Pending]] = [deque() for _ in range(levels)]
        default, own = policy.default_queue_policy, dict(policy.level_policies)
        queues = [own.get(level, default) for level in range(1, levels + 1)]
        self._timeouts = [queue.timeout_us for queue in queues]
        self._delays = [queue.delay and bool(queue.timeout_us) for queue in queues]
        self._timed = any(self._timeouts)
        # Without DELAY nothing is ever delayed: the hot paths skip the delayed queues.
        self._delaying = any(self._delays)
        # The whole queue holds at most its largest level's bound; a level whose own bound
        # is smaller is held to it as well (0: nothing beyond the whole queue's).
        self._max_count = 0 if not all(q.max_queue_size for q in queues) else max(
            q.max_queue_size for q in queues)
        self._level_caps = [q.max_queue_size if q.max_queue_size != self._max_count else 0
                            for q in queues]
        self._capped = any(self._level_caps)
        self._delay = policy.max_queue_delay_us / _US_PER_S
        self._largest_preferred = max(policy.preferred_batch_sizes, default=0)
        self._count = 0
        self._rows = 0
        self._bytes = 0  # queued + taken and not yet released

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Pending]:
        """The queued entries in queue order."""
        return self._in_order()

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
        """Queue `entry`, setting its queue timeout and clamping its priority; returns the
        entries shed to make room for it (each to be answered with its error).

        When the queue is full (`max_queue_size` requests or `max_queue_bytes` bytes), the
        newest entries of less urgent levels than the arrival's are shed, least urgent level
        first, until it fits; when shedding them all would not make room, nothing is shed and
        the arrival is refused with QueueFull, as it is when its own level holds its
        `priority_queue_policy`'s `max_queue_size`. InvalidArgument when the entry's rows
        exceed `max_batch_size` (it could never be sent). Refusals carry `retry_after()`
        seconds (worked out only when something is refused or shed).
        """
        self._check_rows(entry)
        level = self.policy.level_of(entry.priority)
        if self._capped and self._level_caps[level - 1]:
            self._check_level_room(level, retry_after)
        victims = self._victims(level, entry.size, retry_after)
        shed = [Shed(victim, self._shed_error(retry_after())) for _, victim in victims]
        if victims:
            for queue, _ in victims:  # the newest first: each is the last of its queue
                queue.pop()
            self._forget([victim for _, victim in victims])
        if self._timed and self._timeouts[level - 1]:
            entry.timeout_at = entry.enqueued + self._timeouts[level - 1] / _US_PER_S
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
        """Remove and return every entry whose deadline, or queue timeout under REJECT, is at
        or before `now` (`expiry` says which); an entry past its queue timeout under DELAY
        moves behind the others of its level instead."""
        expired: list[Pending] = []
        due = _is_due if self._timed else _is_expired
        for index, level in enumerate(self._levels):
            if any(due(entry, now) for entry in level):
                self._levels[index] = self._sort_out(level, index, now, expired)
            delayed = self._delayed[index]
            if self._delaying and delayed and any(_is_expired(entry, now) for entry in delayed):
                kept: deque[Pending] = deque()
                for entry in delayed:
                    (expired if _is_expired(entry, now) else kept).append(entry)
                self._delayed[index] = kept
        self._forget(expired)
        return expired

    def _sort_out(self, level: deque[Pending], index: int, now: float,
                  expired: list[Pending]) -> deque[Pending]:
        """The entries of `level` still waiting in it; the expired go to `expired`, those
        past a DELAY timeout to the back of the level's delayed ones."""
        kept: deque[Pending] = deque()
        for entry in level:
            if _is_expired(entry, now):
                expired.append(entry)
            elif entry.timeout_at is not None and entry.timeout_at <= now:
                if self._delays[index]:
                    entry.timeout_at = None
                    self._delayed[index].append(entry)
                else:
                    expired.append(entry)
            else:
                kept.append(entry)
        return kept

    def expiry(self, entry: Pending, now: float) -> DeadlineExceeded | Unavailable:
        """The answer of `entry`, returned by `expire(now)`: its caller's deadline passed
        before it was sent (DEADLINE_EXCEEDED), or its level's queue timeout did (UNAVAILABLE,
        as Triton answers it: the caller's own deadline had not passed)."""
        if entry.deadline is not None and entry.deadline <= now:
            return DeadlineExceeded("deadline exceeded while queued for a batch (never computed)")
        where = f" of priority level {entry.priority}" if self.policy.levels > 1 else ""
        return Unavailable(
            f"queue timeout expired: waited longer than the default_timeout_microseconds "
            f"{self._timeouts[entry.priority - 1]}{where} for a batch (never computed)")

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
        if not self._delay:  # work-conserving: the preferred part, else all that fits
            return Send(self._preferred_part(candidate) or len(candidate.entries))
        send_at = min(entry.enqueued for entry in candidate.entries) + self._delay
        if now >= send_at:  # the delay ran out: all that fits, preferred or not
            return Send(len(candidate.entries))
        early = self._preferred_part(candidate)
        if early:
            return Send(early)
        if candidate.closed:
            return Send(len(candidate.entries))
        return Wait(_earliest(send_at, nearest))

    def take(self, count: int) -> list[Pending]:
        """Pop the first `count` entries in queue order."""
        taken: list[Pending] = []
        for index, level in enumerate(self._levels):
            while level and len(taken) < count:
                taken.append(level.popleft())
            delayed = self._delayed[index]
            while self._delaying and delayed and len(taken) < count:
                taken.append(delayed.popleft())
        self._count -= len(taken)
        self._rows -= sum(entry.rows for entry in taken)
        return taken

    def _in_order(self) -> Iterator[Pending]:
        if not self._delaying:
            for level in self._levels:
                yield from level
            return
        for index, level in enumerate(self._levels):
            yield from level
            yield from self._delayed[index]

    def _candidate(self) -> _Candidate:
        """The batch at the front of the queue, and whether it can grow no further."""
        entries = self._in_order()
        first = next(entries)
        cap = self.policy.max_batch_size
        if cap == 0 or not self.policy.merges:
            return _Candidate((first,), first.rows, closed=True)
        taken, rows = [first], first.rows
        for entry in entries:
            if entry.key != first.key or rows + entry.rows > cap:
                return _Candidate(tuple(taken), rows, closed=True)
            taken.append(entry)
            rows += entry.rows
        return _Candidate(tuple(taken), rows, closed=rows >= cap)

    def _preferred_part(self, candidate: _Candidate) -> int:
        """Entries at the front of the candidate to send at once, before the queue delay
        runs out (0: none). As Triton: the longest part whose rows make a preferred size;
        failing that, when the candidate's rows pass the largest preferred size, the longest
        part that stays within it (at least its first entry)."""
        preferred, largest = self.policy.preferred_batch_sizes, self._largest_preferred
        if not largest:
            return 0
        best = within = rows = 0
        for count, entry in enumerate(candidate.entries, start=1):
            rows += entry.rows
            if rows > largest:
                return best or max(within, 1)
            within = count
            if rows in preferred:
                best = count
        return best

    def _nearest_deadline(self) -> float | None:
        """The soonest time an entry's deadline or queue timeout passes."""
        times = [e.deadline for e in self._in_order() if e.deadline is not None]
        if self._timed:
            times += [e.timeout_at for e in self._in_order() if e.timeout_at is not None]
        return min(times, default=None)

    def _check_level_room(self, level: int,
                          retry_after: Callable[[], float]) -> None:
        """Refuse an arrival at `level` when the level holds its own `max_queue_size`."""
        cap = self._level_caps[level - 1]
        held = len(self._levels[level - 1]) + len(self._delayed[level - 1])
        if held >= cap:
            raise QueueFull(f"{self._name()} is full at priority level {level} "
                            f"(max_queue_size {cap} of its priority_queue_policy; "
                            f"{held} requests at that level)", "queue_full", retry_after())

    def _victims(self, level: int, size: int,
                 retry_after: Callable[[], float]) -> list[tuple[deque[Pending], Pending]]:
        """The entries to shed (each with the queue it is the last of when its turn comes)
        so that an arrival of `size` bytes at `level` fits: the newest of the least urgent
        level first, never one as urgent as the arrival. Raises QueueFull when even shedding
        all of those would not make room."""
        max_count, max_bytes = self._max_count, self.policy.max_queue_bytes
        if max_bytes > 0 and size > max_bytes:
            raise QueueFull(f"request of {size} bytes for {self._name()} exceeds "
                            f"max_queue_bytes {max_bytes}", "bytes", retry_after())
        count, held = self._count, self._bytes
        victims: list[tuple[deque[Pending], Pending]] = []
        candidates = None  # made only when the queue has no room (rarely)
        while True:
            over_count = max_count > 0 and count + 1 > max_count
            over_bytes = max_bytes > 0 and held + size > max_bytes
            if not (over_count or over_bytes):
                return victims
            if candidates is None:
                candidates = self._newest_first(level)
            victim = next(candidates, None)
            if victim is None:
                reason = "queue_full" if over_count else "bytes"
                limit = (f"max_queue_size {max_count}" if over_count
                         else f"max_queue_bytes {max_bytes}")
                raise QueueFull(f"{self._name()} is full ({limit}; {self._occupancy()})",
                                reason, retry_after())
            victims.append(victim)
            count -= 1
            held -= victim[1].size

    def _newest_first(self, level: int) -> Iterator[tuple[deque[Pending], Pending]]:
        """The entries of the levels less urgent than `level`, each with its queue: the least
        urgent level first, and within a level the last in its order first."""
        for index in range(len(self._levels) - 1, level - 1, -1):
            for queue in (self._delayed[index], self._levels[index]):
                for entry in reversed(queue):
                    yield queue, entry

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


def _is_due(entry: Pending, now: float) -> bool:
    """Its deadline or its queue timeout has passed."""
    return ((entry.deadline is not None and entry.deadline <= now)
            or (entry.timeout_at is not None and entry.timeout_at <= now))


def _earliest(a: float | None, b: float | None) -> float | None:
    """The earlier of two optional times; None means no time."""
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
