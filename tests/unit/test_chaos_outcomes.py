"""The chaos suite's bookkeeping: how each answer is classified, and the report's verdicts."""

import pytest

from tests.chaos.outcomes import (
    INPUT_REFUSALS,
    Outcome,
    Row,
    Tally,
    classify,
    markdown_table,
)

DEADLINE = 30.0


@pytest.mark.parametrize(("code", "message", "elapsed", "output_ok", "refusals", "outcome"), [
    ("OK", "", 0.01, True, None, Outcome.SUCCEEDED),
    ("OK", "", 0.01, False, None, Outcome.FAILED),  # a wrong output
    ("RESOURCE_EXHAUSTED", "queue full", 0.01, False, None, Outcome.REFUSED),
    ("UNAVAILABLE", "no replica", 0.01, False, None, Outcome.REFUSED),
    ("DEADLINE_EXCEEDED", "queued too long", 0.5, False, None, Outcome.REFUSED),
    ("DEADLINE_EXCEEDED", "Deadline Exceeded", 29.9, False, None, Outcome.LOST),
    ("DEADLINE_EXCEEDED", "Deadline Exceeded", 30.0, False, None, Outcome.LOST),
    ("UNAVAILABLE", "", 0.01, False, None, Outcome.FAILED),  # refused, but not clearly
    ("CANCELLED", "CANCELLED", 0.01, False, None, Outcome.FAILED),
    ("INTERNAL", "internal error (id 1)", 0.01, False, None, Outcome.FAILED),
    ("INVALID_ARGUMENT", "unknown input 'x'", 0.01, False, None, Outcome.FAILED),
    ("INVALID_ARGUMENT", "unknown input 'x'", 0.01, False, INPUT_REFUSALS, Outcome.REFUSED),
    ("UNKNOWN", "Unexpected DecodeError", 0.01, False, INPUT_REFUSALS, Outcome.FAILED),
])
def test_classify(code, message, elapsed, output_ok, refusals, outcome):
    extra = {} if refusals is None else {"refusals": refusals}
    assert classify(code, message, elapsed, DEADLINE, output_ok, **extra) is outcome


def tally_of(sent: int, **counts: int) -> Tally:
    tally = Tally("t", sent=sent)
    for name, count in counts.items():
        code = "OK" if name == "succeeded" else name.upper()
        outcome = Outcome.REFUSED if code == "UNAVAILABLE" else (
            Outcome.SUCCEEDED if code == "OK" else Outcome.FAILED)
        for _ in range(count):
            tally.record(outcome, code, "m")
    return tally


@pytest.mark.parametrize(("tally", "max_failed", "tolerated", "verdict"), [
    (tally_of(3, succeeded=2, unavailable=1), 0, "", "pass"),
    (tally_of(4, succeeded=2, unavailable=1), 0, "", "FAIL (unaccounted requests)"),
    (tally_of(2, succeeded=1, cancelled=1), 0, "", "FAIL (failed > 0)"),
    (tally_of(2, succeeded=1, cancelled=1), 2, "CANCELLED", "pass"),
    (tally_of(3, succeeded=1, cancelled=1, internal=1), 2, "CANCELLED",
     "FAIL (failures other than CANCELLED)"),
])
def test_verdicts(tally, max_failed, tolerated, verdict):
    assert Row(tally, "fault", max_failed, tolerated).verdict == verdict


@pytest.mark.parametrize(("tally", "max_refused", "verdict"), [
    (tally_of(20, succeeded=4, unavailable=16), None, "pass"),
    (tally_of(20, succeeded=4, unavailable=16), 16, "pass"),
    (tally_of(20, succeeded=3, unavailable=17), 16, "FAIL (refused > 16)"),
    (tally_of(2, succeeded=1, unavailable=1), 0, "FAIL (refused > 0)"),
])
def test_refusal_bound(tally, max_refused, verdict):
    assert Row(tally, "fault", max_refused=max_refused).verdict == verdict


def test_lost_requests_fail_the_row():
    tally = Tally("t", sent=5)
    for _ in range(3):
        tally.record(Outcome.SUCCEEDED)
    tally.never_answered(2)
    assert (tally.lost, tally.accounted) == (2, True)
    assert Row(tally, "fault").verdict == "FAIL (lost requests)"


def test_tallies_add_up():
    total = Tally("all")
    total.add(tally_of(2, succeeded=1, unavailable=1))
    total.add(tally_of(1, cancelled=1))
    assert (total.sent, total.succeeded, total.refused, total.failed) == (3, 1, 1, 1)
    assert dict(total.statuses) == {"UNAVAILABLE": 1, "CANCELLED": 1}


def test_markdown_table():
    tally = tally_of(3, succeeded=2, unavailable=1)
    table = markdown_table([Row(tally, "kill -9")])
    assert table.splitlines()[2] == ("| t | kill -9 | 3 | 2 | 1 | 0 | 0 | UNAVAILABLE 1 "
                                     "| - / - | pass |")  # no latencies recorded
    for n in range(200):  # successes at 1..200 ms, refusals at 3 ms and one at 2.5 s
        tally.record(Outcome.SUCCEEDED, elapsed=(n + 1) / 1000)
    tally.record(Outcome.REFUSED, "UNAVAILABLE", "m", 0.003)
    tally.record(Outcome.REFUSED, "UNAVAILABLE", "m", 2.5)
    tally.sent += 202
    assert tally.p99_ms(Outcome.SUCCEEDED) == pytest.approx(198.0)
    assert tally.p99_ms(Outcome.REFUSED) == pytest.approx(2500.0)
    assert tally.p99_ms(Outcome.LOST) is None
    assert markdown_table([Row(tally, "kill -9")]).splitlines()[2].endswith(
        "| 198 / 2,500 | pass |")


def test_latencies_add_up_across_tallies():
    one, two = Tally("a"), Tally("b")
    one.record(Outcome.REFUSED, "UNAVAILABLE", "m", 0.010)
    two.record(Outcome.REFUSED, "UNAVAILABLE", "m", 0.030)
    one.add(two)
    assert one.p99_ms(Outcome.REFUSED) == pytest.approx(30.0)
