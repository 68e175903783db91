"""Live statistics: deltas of cumulative counters, windows, rates and percentiles."""

import pytest

from meshserve.mesh.live import History, Sample, Window, window

BOUNDS = (1.0, 5.0, 10.0)  # four buckets: <=1, <=5, <=10, overflow


def s(at: float, requests: int, failures: int = 0, buckets=(0, 0, 0, 0)) -> Sample:
    return Sample(at, requests, failures, tuple(buckets))


# Cumulative counters of one batcher, sampled at fake times 0, 1, 2, 3, 5.
SAMPLES = [
    s(0.0, 100, 1, (50, 40, 9, 1)),
    s(1.0, 110, 1, (55, 44, 10, 1)),
    s(2.0, 130, 3, (60, 55, 14, 1)),
    s(3.0, 160, 4, (70, 70, 18, 2)),
    s(5.0, 200, 10, (80, 90, 26, 4)),
]

# name, seconds, expected delta
DELTAS = [
    ("window bigger than the history: from the oldest", 60.0, s(5.0, 100, 9, (30, 50, 17, 3))),
    ("exactly the whole history", 5.0, s(5.0, 100, 9, (30, 50, 17, 3))),
    ("last sample at least 2 s older", 2.0, s(2.0, 40, 6, (10, 20, 8, 2))),
    ("between samples: the one at least that old", 2.5, s(3.0, 70, 7, (20, 35, 12, 3))),
    ("exactly 3 s", 3.0, s(3.0, 70, 7, (20, 35, 12, 3))),
    ("shorter than the newest gap: the previous sample", 0.5, s(2.0, 40, 6, (10, 20, 8, 2))),
    ("zero seconds: nothing", 0.0, s(0.0, 0, 0, (0, 0, 0, 0))),
]


@pytest.mark.parametrize("seconds, expected", [c[1:] for c in DELTAS],
                         ids=[c[0] for c in DELTAS])
def test_history_delta(seconds, expected):
    history = History()
    for sample in SAMPLES:
        history.add(sample)
    assert history.delta(seconds) == expected


def test_history_delta_without_samples_is_none():
    assert History().delta(10.0) is None
    assert History().delta_since(10.0) is None


# name, since, expected delta: from the first sample at or after `since`, never before it
SINCE = [
    ("before the history: from the oldest", -10.0, s(5.0, 100, 9, (30, 50, 17, 3))),
    ("exactly at a sample: from it", 2.0, s(3.0, 70, 7, (20, 35, 12, 3))),
    ("between samples: from the next one, not the one before", 1.5,
     s(3.0, 70, 7, (20, 35, 12, 3))),
    ("after the newest gap began: the newest alone", 3.5, s(0.0, 0, 0, (0, 0, 0, 0))),
    ("after every sample: nothing", 9.0, s(0.0, 0, 0, (0, 0, 0, 0))),
]


@pytest.mark.parametrize("since, expected", [c[1:] for c in SINCE], ids=[c[0] for c in SINCE])
def test_history_delta_since_counts_nothing_from_before(since, expected):
    history = History()
    for sample in SAMPLES:
        history.add(sample)
    assert history.delta_since(since) == expected


@pytest.mark.parametrize("seconds", [0.0, 1.0, 600.0])
def test_history_delta_with_one_sample_is_zeros(seconds):
    history = History()
    history.add(s(7.0, 500, 20, (1, 2, 3, 4)))
    assert history.delta(seconds) == s(0.0, 0, 0, (0, 0, 0, 0))


def test_history_drops_samples_older_than_it_keeps():
    history = History(keep_seconds=2.0)
    for sample in SAMPLES:
        history.add(sample)
    # 0, 1 and 2 are more than 2 s before 5; 3 is kept and is now the oldest.
    assert history.delta(60.0) == s(2.0, 40, 6, (10, 20, 8, 2))


def test_history_keeps_a_sample_exactly_at_the_limit():
    history = History(keep_seconds=3.0)
    for sample in SAMPLES:
        history.add(sample)
    assert history.delta(60.0) == s(3.0, 70, 7, (20, 35, 12, 3))


def w(requests: int = 0, failures: int = 0, buckets=(0, 0, 0, 0), seconds: float = 10.0,
      bounds=BOUNDS) -> Window:
    return Window(seconds, requests, failures, tuple(buckets), bounds)


# name, window, rate, error rate
RATES = [
    ("100 in 10 s", w(100, 5), 10.0, 0.05),
    ("no requests", w(0, 0), 0.0, 0.0),
    ("all failed", w(8, 8, seconds=4.0), 2.0, 1.0),
    ("zero-length window", w(100, 1, seconds=0.0), 0.0, 0.01),
    ("negative span", w(100, 0, seconds=-1.0), 0.0, 0.0),
]


@pytest.mark.parametrize("found, rate, error_rate", [c[1:] for c in RATES],
                         ids=[c[0] for c in RATES])
def test_window_rate_and_error_rate(found, rate, error_rate):
    assert found.rate == rate
    assert found.error_rate == error_rate


# name, buckets, percentile, expected upper bound (ms) or None
PERCENTILES = [
    ("p50 in the first bucket", (50, 40, 9, 1), 50, 1.0),
    ("p51 in the second", (50, 40, 9, 1), 51, 5.0),
    ("p90 at the end of the second", (50, 40, 9, 1), 90, 5.0),
    ("p99 in the third", (50, 40, 9, 1), 99, 10.0),
    ("p100 in the overflow bucket: twice the last bound", (50, 40, 9, 1), 100, 20.0),
    ("p99 in the overflow bucket", (0, 0, 98, 2), 99, 20.0),
    ("p0 skips empty buckets", (0, 0, 3, 0), 0, 10.0),
    ("p50 of one sample", (0, 1, 0, 0), 50, 5.0),
    ("p99 of one sample", (0, 1, 0, 0), 99, 5.0),
    ("p50 skips an empty middle bucket", (1, 0, 1, 0), 50, 1.0),
    ("p51 skips an empty middle bucket", (1, 0, 1, 0), 51, 10.0),
    ("p99 all in the overflow", (0, 0, 0, 7), 99, 20.0),
    ("empty: None", (0, 0, 0, 0), 50, None),
    ("empty p99: None", (0, 0, 0, 0), 99, None),
]


@pytest.mark.parametrize("buckets, p, expected", [c[1:] for c in PERCENTILES],
                         ids=[c[0] for c in PERCENTILES])
def test_window_percentile_is_the_upper_bound_of_its_bucket(buckets, p, expected):
    assert w(sum(buckets), buckets=buckets).percentile(p) == expected


def test_window_percentile_with_no_buckets_is_none():
    assert Window(1.0, 0, 0, (), ()).percentile(50) is None


def test_window_percentile_at_an_exact_bucket_boundary():
    assert Window(1.0, 100, 0, (7, 93), (1.0,)).percentile(7) == 1.0


def test_window_sums_two_batchers():
    a = s(2.0, 30, 1, (10, 15, 5, 0))
    b = s(1.5, 12, 3, (2, 0, 4, 6))
    found = window([a, b], BOUNDS, 10.0)
    assert found == Window(2.0, 42, 4, (12, 15, 9, 6), BOUNDS)
    assert found.rate == 21.0
    assert found.error_rate == 4 / 42
    assert found.percentile(50) == 5.0
    assert found.percentile(99) == 20.0


# name, deltas, expected window
WINDOWS = [
    ("no batchers: the asked span, all zeros", [], Window(10.0, 0, 0, (0, 0, 0, 0), BOUNDS)),
    ("only zero deltas: the asked span", [s(0.0, 0), s(0.0, 0)],
     Window(10.0, 0, 0, (0, 0, 0, 0), BOUNDS)),
    ("span is the longest delta", [s(3.0, 6, 0, (6, 0, 0, 0)), s(0.0, 0)],
     Window(3.0, 6, 0, (6, 0, 0, 0), BOUNDS)),
    ("extra buckets are cut to the bounds", [s(1.0, 5, 0, (1, 1, 1, 1, 1))],
     Window(1.0, 5, 0, (1, 1, 1, 1), BOUNDS)),
    ("fewer buckets are padded", [s(1.0, 3, 0, (2, 1))], Window(1.0, 3, 0, (2, 1, 0, 0), BOUNDS)),
]


@pytest.mark.parametrize("deltas, expected", [c[1:] for c in WINDOWS],
                         ids=[c[0] for c in WINDOWS])
def test_window_of_deltas(deltas, expected):
    assert window(deltas, BOUNDS, 10.0) == expected


def test_window_of_histories():
    first, second = History(), History()
    for at, requests, failures in [(0.0, 10, 0), (1.0, 20, 1), (2.0, 40, 2)]:
        first.add(s(at, requests, failures, (requests, 0, 0, 0)))
        second.add(s(at + 0.5, requests * 2, 0, (0, requests * 2, 0, 0)))
    found = window([first.delta(1.0), second.delta(1.0)], BOUNDS, 1.0)
    assert found == Window(1.0, 60, 1, (20, 40, 0, 0), BOUNDS)
    assert found.rate == 60.0
    assert found.percentile(33) == 1.0
    assert found.percentile(34) == 5.0


def test_history_starts_again_when_a_batcher_restarts():
    history = History()
    history.add(Sample(0.0, 100, 5, (100, 0)))
    history.add(Sample(1.0, 3, 0, (3, 0)))  # counters began again
    history.add(Sample(2.0, 10, 1, (10, 0)))
    assert history.delta(5.0) == Sample(1.0, 7, 1, (7, 0))
