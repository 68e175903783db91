"""Per-principal token buckets on a fake clock."""

import pytest

from meshserve.ingress.quota import Buckets


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("rate", "burst", "steps", "waits"), [
    # (advance the clock by, then take): the waits returned, 0 meaning admitted.
    (2.0, 2.0, [0, 0, 0], [0, 0, 0.5]),
    (2.0, 2.0, [0, 0, 0, 0.25], [0, 0, 0.5, 0.25]),
    (2.0, 2.0, [0, 0, 0.5, 0], [0, 0, 0, 0.5]),  # refilled one token
    (2.0, 2.0, [0, 0, 10, 0, 0], [0, 0, 0, 0, 0.5]),  # refill capped at burst
    (4.0, 1.0, [0, 0.1, 0.15], [0, 0.15, 0]),
    (0.0, 0.0, [0] * 5, [0] * 5),  # rate 0: unlimited
])
def test_bucket_refill(rate, burst, steps, waits):
    clock = Clock()
    buckets = Buckets(clock)
    got = []
    for step in steps:
        clock.now += step
        got.append(round(buckets.take("p", rate, burst), 6))
    assert got == waits


def test_principals_have_their_own_buckets():
    clock = Clock()
    buckets = Buckets(clock)
    assert buckets.take("a", 1.0, 1.0) == 0
    assert buckets.take("a", 1.0, 1.0) == pytest.approx(1.0)
    assert buckets.take("b", 1.0, 1.0) == 0


def test_least_recently_used_buckets_are_forgotten():
    clock = Clock()
    buckets = Buckets(clock, max_keys=2)
    for key in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" arrives
        buckets.take(key, 1.0, 1.0)
    assert buckets.take("a", 1.0, 1.0) > 0
    assert buckets.take("b", 1.0, 1.0) == 0  # forgotten: starts full
