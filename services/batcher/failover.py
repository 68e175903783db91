"""Pure rules for failing over between compute replicas: outlier ejection and readmission,
the stall timeout, the retry budget, and the retry hint a refusal carries.

Nothing here reads a clock or does I/O: callers pass the monotonic time as `now`.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field

from meshserve.common.errors import Unavailable


@dataclass(frozen=True)
class FailoverSettings:
    """How the batcher takes compute replicas out and puts them back, and retries batches."""

    stall_timeout: float = 0.0  # seconds a batch may take before its replica counts as
    # stalled; 0 = derived from observed batch latency (`stall_timeout`)
    consecutive_failures: int = 2  # UNAVAILABLE answers in a row that eject a replica
    ejection_seconds: float = 1.0  # an ejected replica stays out at least this long
    probe_interval: float = 0.25  # health probes of an ejected replica, seconds apart
    retry_ratio: float = 0.2  # retries allowed per batch sent, over `retry_window`
    retry_floor: int = 3  # retries always allowed per window, however few batches were sent
    retry_window: float = 10.0  # seconds


def stall_timeout(configured: float, p99: float | None, *, floor: float = 1.0,
                  factor: float = 20.0, unknown: float = 5.0) -> float:
    """The time after which a batch's replica counts as stalled: `configured` when set, else
    `factor` × the observed p99 batch latency (at least `floor`), `unknown` before enough
    batches were seen."""
    if configured > 0:
        return configured
    if p99 is None:
        return unknown
    return max(floor, factor * p99)


class LatencyWindow:
    """The latencies of the last `size` batches; quantiles once `minimum` were seen."""

    def __init__(self, size: int = 256, minimum: int = 20) -> None:
        self._seconds: deque[float] = deque(maxlen=size)
        self._ordered: list[float] = []  # the same values, sorted: a quantile is a lookup
        self._minimum = minimum

    def add(self, seconds: float) -> None:
        if len(self._seconds) == self._seconds.maxlen:
            del self._ordered[bisect.bisect_left(self._ordered, self._seconds[0])]
        self._seconds.append(seconds)
        bisect.insort(self._ordered, seconds)

    def quantile(self, q: float) -> float | None:
        ordered = self._ordered
        if len(ordered) < self._minimum:
            return None
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Outlier:
    """One replica's standing: in rotation, or ejected (after `consecutive_failures`
    failures in a row, or one stall) until `ejection_seconds` passed and a health probe
    succeeded. Once ejected, further failures change nothing until it is readmitted."""

    consecutive_failures: int = 2
    ejection_seconds: float = 1.0
    failures: int = 0
    ejected_at: float | None = None
    reason: str = ""

    @property
    def ejected(self) -> bool:
        return self.ejected_at is not None

    def success(self) -> None:
        self.failures = 0

    def failure(self, now: float, last_in_rotation: bool = False) -> bool:
        """An UNAVAILABLE answer; True when this ejects the replica. The last replica in
        rotation is never ejected (as Envoy's max_ejection_percent): its health check
        decides, and the failures still count."""
        self.failures += 1
        if self.failures >= self.consecutive_failures and not last_in_rotation:
            return self._eject(now, "failures")
        return False

    def stall(self, now: float, last_in_rotation: bool = False) -> bool:
        """A batch outlived the stall timeout; True when this ejects the replica."""
        return False if last_in_rotation else self._eject(now, "stall")

    def may_readmit(self, now: float, probe_ok: bool) -> bool:
        return (self.ejected_at is not None and probe_ok
                and now >= self.ejected_at + self.ejection_seconds)

    def readmit(self) -> None:
        self.ejected_at = None
        self.failures = 0
        self.reason = ""

    def _eject(self, now: float, reason: str) -> bool:
        if self.ejected_at is not None:
            return False
        self.ejected_at = now
        self.reason = reason
        return True


@dataclass
class RetryBudget:
    """Retries never amplify an outage: within any `window` seconds, at most `floor` +
    `ratio` × (batches sent) retries are allowed."""

    ratio: float = 0.2
    floor: int = 3
    window: float = 10.0
    _sent: deque[float] = field(default_factory=deque, init=False, repr=False)
    _retried: deque[float] = field(default_factory=deque, init=False, repr=False)

    def sent(self, now: float) -> None:
        """A batch left for its first attempt."""
        self._sent.append(now)

    def try_retry(self, now: float) -> bool:
        """Spend a retry if the budget allows one; False when it is exhausted."""
        self._forget(now)
        if len(self._retried) + 1 > self.floor + self.ratio * len(self._sent):
            return False
        self._retried.append(now)
        return True

    def _forget(self, now: float) -> None:
        horizon = now - self.window
        for times in (self._sent, self._retried):
            while times and times[0] <= horizon:
                times.popleft()


def retry_after(queued_rows: int, max_batch_size: int, batch_seconds: float | None,
                replicas: int, *, least: float = 0.01, most: float = 5.0,
                unknown: float = 0.05) -> float:
    """A refusal's hint: about the time the replicas need to drain what is queued
    (batches × typical batch latency ÷ replicas), within [least, most]."""
    if batch_seconds is None or replicas <= 0:
        return unknown
    batches = math.ceil(queued_rows / max(max_batch_size, 1))
    return min(most, max(least, batches * batch_seconds / replicas))


def no_replica(model: str, version: str, settings: FailoverSettings,
               state: str = "ready") -> Unavailable:
    """The refusal while no compute replica of a version is `state` ("ready", or "in
    rotation" after an ejection); it asks callers to retry after an ejection's length."""
    return Unavailable(f"no compute replica of model '{model}' version '{version}' is {state}",
                       settings.ejection_seconds)
