"""Failover rules between compute replicas: pure, with a plain float for the clock."""

import pytest

from meshserve.batcher.failover import (
    LatencyWindow,
    Outlier,
    RetryBudget,
    retry_after,
    stall_timeout,
)

# --- retry budget ----------------------------------------------------------------------------


def spend(budget, now, count):
    return sum(budget.try_retry(now) for _ in range(count))


def test_retry_budget_floor_when_idle():
    budget = RetryBudget(ratio=0.2, floor=3, window=10.0)
    assert spend(budget, 0.0, 10) == 3


def test_retry_budget_grows_with_batches_sent():
    budget = RetryBudget(ratio=0.2, floor=3, window=10.0)
    for i in range(100):
        budget.sent(i * 0.01)
    assert spend(budget, 1.0, 100) == 3 + 20


def test_retry_budget_window_forgets_old_batches_and_retries():
    budget = RetryBudget(ratio=0.2, floor=1, window=10.0)
    for _ in range(50):
        budget.sent(0.0)
    assert spend(budget, 5.0, 100) == 11
    assert spend(budget, 9.9, 5) == 0  # still within the window: spent
    assert spend(budget, 10.0, 5) == 0  # batches at 0.0 forgotten; 11 retries at 5.0 remain
    assert spend(budget, 15.0, 5) == 1  # retries at 5.0 forgotten too; only the floor


@pytest.mark.parametrize("sent, retries_allowed", [(0, 2), (4, 2), (5, 3), (50, 12)])
def test_retry_budget_table(sent, retries_allowed):
    budget = RetryBudget(ratio=0.2, floor=2, window=1.0)
    for _ in range(sent):
        budget.sent(0.0)
    assert spend(budget, 0.5, 100) == retries_allowed


def test_retries_never_amplify_an_outage():
    """Every batch fails: retries stay within ratio x batches + floor per window."""
    budget = RetryBudget(ratio=0.2, floor=3, window=10.0)
    retried = 0
    for step in range(1000):  # 1000 batches over 10 s, each wanting a retry
        now = step * 0.01
        budget.sent(now)
        retried += budget.try_retry(now)
    assert retried <= 3 + 0.2 * 1000
    assert retried >= 0.2 * 1000 - 1


# --- ejection and readmission -----------------------------------------------------------------

# (events, ejected after them, reason): "f" failure, "s" success, "x" stall; time = index
OUTLIER = [
    ("f", False, ""),
    ("ff", True, "failures"),
    ("fsf", False, ""),
    ("fsff", True, "failures"),
    ("x", True, "stall"),
    ("sx", True, "stall"),
    ("xf", True, "stall"),
    ("fffff", True, "failures"),
]


@pytest.mark.parametrize("events, ejected, reason", OUTLIER)
def test_outlier_ejection(events, ejected, reason):
    outlier = Outlier(consecutive_failures=2, ejection_seconds=1.0)
    newly = []
    for now, event in enumerate(events):
        if event == "f":
            newly.append(outlier.failure(float(now)))
        elif event == "x":
            newly.append(outlier.stall(float(now)))
        else:
            outlier.success()
    assert outlier.ejected is ejected
    assert outlier.reason == reason
    assert sum(newly) == (1 if ejected else 0)  # an ejection is reported once


# (ejected at, probe time, probe healthy, may readmit)
READMIT = [
    (10.0, 10.5, True, False),  # too soon, however healthy
    (10.0, 11.0, False, False),  # time served, but the probe failed (still dead or stalled)
    (10.0, 11.0, True, True),
    (10.0, 30.0, True, True),
]


@pytest.mark.parametrize("ejected_at, now, healthy, readmit", READMIT)
def test_outlier_readmission(ejected_at, now, healthy, readmit):
    outlier = Outlier(consecutive_failures=1, ejection_seconds=1.0)
    assert outlier.failure(ejected_at)
    assert outlier.may_readmit(now, healthy) is readmit


def test_readmitted_replica_starts_afresh():
    outlier = Outlier(consecutive_failures=2, ejection_seconds=1.0)
    outlier.stall(0.0)
    assert not outlier.may_readmit(0.5, True)
    assert outlier.may_readmit(2.0, True)
    outlier.readmit()
    assert (outlier.ejected, outlier.failures, outlier.reason) == (False, 0, "")
    assert not outlier.failure(3.0)  # needs two failures in a row again
    assert outlier.failure(3.1)


@pytest.mark.parametrize("events", ["ff", "fff", "x", "fx"])
def test_last_replica_in_rotation_is_never_ejected(events):
    outlier = Outlier(consecutive_failures=2, ejection_seconds=1.0)
    for now, event in enumerate(events):
        if event == "f":
            assert not outlier.failure(float(now), last_in_rotation=True)
        else:
            assert not outlier.stall(float(now), last_in_rotation=True)
    assert not outlier.ejected
    assert outlier.failures == events.count("f")  # still counted: ejected once others return
    ejected = outlier.failure(9.0)  # another replica is back: this failure may eject it
    assert ejected is (events.count("f") + 1 >= 2)


def test_in_rotation_replica_is_never_readmitted():
    assert not Outlier().may_readmit(100.0, True)


# --- stall timeout, latency, retry hint -------------------------------------------------------

@pytest.mark.parametrize("configured, p99, expected", [
    (2.5, 0.01, 2.5),  # configured wins
    (0.0, None, 5.0),  # nothing observed yet
    (0.0, 0.01, 1.0),  # 20 x 10 ms = 0.2 s, raised to the 1 s floor
    (0.0, 0.2, 4.0),  # 20 x p99
])
def test_stall_timeout(configured, p99, expected):
    assert stall_timeout(configured, p99) == pytest.approx(expected)


def test_latency_window_quantiles_after_enough_samples():
    window = LatencyWindow(size=100, minimum=20)
    for i in range(19):
        window.add(i / 1000)
    assert window.quantile(0.99) is None
    for i in range(19, 200):
        window.add(i / 1000)
    # the last 100: 0.100 .. 0.199
    assert window.quantile(0.5) == pytest.approx(0.149)
    assert window.quantile(0.99) == pytest.approx(0.198)
    assert window.quantile(1.0) == pytest.approx(0.199)


@pytest.mark.parametrize("rows, max_batch, seconds, replicas, expected", [
    (0, 32, 0.01, 1, 0.01),  # empty queue: the least hint
    (320, 32, 0.01, 1, 0.1),  # 10 batches of 10 ms
    (320, 32, 0.01, 2, 0.05),  # two replicas drain twice as fast
    (10**6, 32, 0.1, 1, 5.0),  # capped
    (100, 32, None, 1, 0.05),  # no latency observed yet
    (100, 32, 0.01, 0, 0.05),  # no replica in rotation
])
def test_retry_after_hint(rows, max_batch, seconds, replicas, expected):
    assert retry_after(rows, max_batch, seconds, replicas) == pytest.approx(expected)


def test_latency_window_quantiles_match_sorting_the_window():
    import math
    import random

    window, recent = LatencyWindow(size=50, minimum=1), []
    rng = random.Random(7)
    for _ in range(500):
        value = rng.random()
        window.add(value)
        recent = [*recent, value][-50:]
        ordered = sorted(recent)
        for q in (0.01, 0.5, 0.99, 1.0):
            assert window.quantile(q) == ordered[min(len(ordered) - 1,
                                                     math.ceil(q * len(ordered)) - 1)]
