"""Per-principal rate limits: one token bucket per principal, on an injected clock.

`Buckets.take(key, rate, burst)` returns 0 when the request may go now, else the seconds
until the bucket holds a whole token again (the retry hint). A rate of 0 means unlimited.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Bucket:
    tokens: float
    updated: float

    def take(self, now: float, rate: float, burst: float) -> float:
        self.tokens = min(burst, self.tokens + (now - self.updated) * rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / rate


class Buckets:
    """Buckets keyed by principal; the least recently used are forgotten beyond
    `max_keys` (a forgotten bucket starts full again)."""

    def __init__(self, clock: Callable[[], float], max_keys: int = 10_000) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    def take(self, key: str, rate: float, burst: float) -> float:
        if rate <= 0:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = Bucket(tokens=burst, updated=now)
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now, rate, burst)
