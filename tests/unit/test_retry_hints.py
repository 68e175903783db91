"""Retry hints: carried in the message across hops and sent as trailing metadata."""

import pytest

from meshserve.common.errors import (
    InvalidArgument,
    OverLimit,
    ResourceExhausted,
    Unavailable,
    from_code,
    retry_after_of,
    retry_hint,
)
from meshserve.common.server import RETRY_AFTER_MS, retry_metadata
from meshserve.ingress.budget import ByteBudget


@pytest.mark.parametrize("seconds, text", [
    (0.05, "retry after 0.05 s"),
    (1.0, "retry after 1 s"),
    (0.0123456, "retry after 0.012 s"),
    (0.0, "retry after 0.001 s"),  # never "0": a retry at once would meet the same refusal
    (2.5, "retry after 2.5 s"),
])
def test_retry_hint_text(seconds, text):
    assert retry_hint(seconds) == text


def test_error_with_retry_after_ends_with_the_hint():
    error = ResourceExhausted("queue is full (max_queue_size 2)", 0.05)
    assert error.message == "queue is full (max_queue_size 2); retry after 0.05 s"
    assert error.retry_after == 0.05
    assert retry_metadata(error) == ((RETRY_AFTER_MS, "50"),)


def test_error_without_hint_has_no_metadata():
    error = InvalidArgument("parameter 'priority' must be a non-negative integer")
    assert error.retry_after is None
    assert retry_metadata(error) == ()


@pytest.mark.parametrize("code, message, seconds", [
    ("RESOURCE_EXHAUSTED", "shed: queue full (3 requests / 9 bytes); retry after 0.2 s", 0.2),
    ("UNAVAILABLE", "compute replica a:1 unavailable; not retried: x; retry after 1.5 s", 1.5),
    ("UNAVAILABLE", "compute replica a:1 unavailable", None),
    ("RESOURCE_EXHAUSTED", "retry after 2 s, or not (mid-message)", None),
])
def test_upstream_refusal_keeps_its_hint(code, message, seconds):
    """A refusal relayed by the next hop (code and message) gets its hint back."""
    error = from_code(code, message)
    assert (error.code, error.message, error.retry_after) == (code, message, seconds)
    assert retry_after_of(message) == seconds


def test_an_upstream_refusal_for_capacity_is_retried_and_one_past_a_limit_is_not():
    """Every refusal for capacity ends with a retry hint; a RESOURCE_EXHAUSTED relayed
    without one is a limit a retry will not pass (an answer over the message limit): not
    retried by the asynchronous API, and HTTP 500, not 429."""
    full = from_code("RESOURCE_EXHAUSTED", "queue is full (max_queue_size 2); retry after 0.05 s")
    assert type(full) is ResourceExhausted and full.retryable
    answer = from_code("RESOURCE_EXHAUSTED", "model 'm' version 1: the answer (outputs 'Y' "
                                             "70000000 bytes) is 70000100 bytes, past the ...")
    assert type(answer) is OverLimit and not answer.retryable
    assert answer.code == "RESOURCE_EXHAUSTED" and answer.http_status == 500


def test_unavailable_hint_in_milliseconds_at_least_one():
    assert retry_metadata(Unavailable("down", 0.0001)) == ((RETRY_AFTER_MS, "1"),)


def test_byte_budget_holds_and_refuses():
    budget = ByteBudget(100, "max_inflight_bytes")
    budget.acquire(60)
    assert budget.held == 60
    with pytest.raises(ResourceExhausted) as refused:
        budget.acquire(50)
    assert refused.value.message == ("over budget max_inflight_bytes 100: 60 bytes held, "
                                     "50 more requested; retry after 0.05 s")
    budget.acquire(40)
    assert budget.held == 100
    budget.release(40)
    budget.release(60)
    assert budget.held == 0
    with pytest.raises(ResourceExhausted) as huge:
        budget.acquire(101)
    assert huge.value.message == ("request of 101 bytes exceeds max_inflight_bytes 100; "
                                  "retry after 0.05 s")
    assert budget.held == 0


def test_byte_budget_zero_is_unbounded():
    budget = ByteBudget(0, "max_inflight_bytes")
    budget.acquire(10**12)
    assert budget.held == 10**12
