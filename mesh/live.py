"""Live statistics per model version, from the batchers' cumulative counters. Pure.

The control plane samples every batcher's counters periodically; a window is the difference
between the newest sample and the one `seconds` earlier, summed over a version's batchers.
"""

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    at: float  # monotonic seconds
    requests: int
    failures: int
    buckets: tuple[int, ...]


@dataclass(frozen=True)
class Window:
    seconds: float
    requests: int
    failures: int
    buckets: tuple[int, ...]
    bounds_ms: tuple[float, ...]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    def percentile(self, p: float) -> float | None:
        """Upper bound (ms) of the bucket holding the p-th percentile; None without data."""
        total = sum(self.buckets)
        if not total:
            return None
        seen = 0
        for index, count in enumerate(self.buckets):
            seen += count
            if seen * 100 >= p * total and count:  # no float rounding of the rank
                return (self.bounds_ms[index] if index < len(self.bounds_ms)
                        else self.bounds_ms[-1] * 2)
        return self.bounds_ms[-1] * 2


class History:
    """Recent samples of one batcher, oldest first."""

    def __init__(self, keep_seconds: float = 600.0) -> None:
        self._samples: deque[Sample] = deque()
        self._keep = keep_seconds

    def add(self, sample: Sample) -> None:
        if self._samples and sample.requests < self._samples[-1].requests:
            self._samples.clear()  # the batcher restarted: its counters began again
        self._samples.append(sample)
        while self._samples and sample.at - self._samples[0].at > self._keep:
            self._samples.popleft()

    def delta(self, seconds: float) -> Sample | None:
        """Counts between the newest sample and the last one at least `seconds` older."""
        if not self._samples:
            return None
        newest = self._samples[-1]
        base = self._samples[0]
        for sample in self._samples:
            if newest.at - sample.at >= seconds:
                base = sample
            else:
                break
        return _between(base, newest)

    def delta_since(self, at: float) -> Sample | None:
        """Counts between the first sample taken at or after `at` and the newest: nothing
        counted before `at` (a judgement of what happened since then)."""
        if not self._samples:
            return None
        newest = self._samples[-1]
        base = next((sample for sample in self._samples if sample.at >= at), newest)
        return _between(base, newest)


def _between(base: Sample, newest: Sample) -> Sample:
    if base is newest:
        return Sample(0.0, 0, 0, tuple(0 for _ in newest.buckets))
    return Sample(newest.at - base.at, newest.requests - base.requests,
                  newest.failures - base.failures,
                  tuple(n - b for n, b in zip(newest.buckets, base.buckets)))


def window(deltas: list[Sample], bounds_ms: tuple[float, ...], seconds: float) -> Window:
    """One version's window: its batchers' deltas added up."""
    width = len(bounds_ms) + 1
    buckets = [0] * width
    for delta in deltas:
        for i, count in enumerate(delta.buckets[:width]):
            buckets[i] += count
    span = max((d.at for d in deltas), default=0.0) or seconds
    return Window(span, sum(d.requests for d in deltas), sum(d.failures for d in deltas),
                  tuple(buckets), bounds_ms)
