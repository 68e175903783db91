"""Table-driven tests of the dynamic batcher's pure decisions; the clock is a plain float."""

import pytest
from google.protobuf import text_format

from meshserve.batcher.policy import (
    BatchingPolicy,
    BatchQueue,
    Pending,
    QueuePolicy,
    Send,
    Wait,
)
from meshserve.common.errors import InvalidArgument, ResourceExhausted
from meshserve.protocol import model_config_pb2


def entry(name, rows=1, at=0.0, key="A", deadline=None, priority=0):
    return Pending(key=key, rows=rows, enqueued=at, deadline=deadline, priority=priority,
                   payload=name)


def queue_of(policy, *entries, label=""):
    queue = BatchQueue(policy, label=label)
    for item in entries:
        queue.add(item)
    return queue


def names(entries):
    return [item.payload for item in entries]


# --- decide ------------------------------------------------------------------------------

DECISIONS = [
    pytest.param(BatchingPolicy(max_batch_size=8), [], 0.0, 1, Wait(None), id="empty"),
    pytest.param(BatchingPolicy(max_batch_size=8, max_queue_delay_us=1000), [], 5.0, 3,
                 Wait(None), id="empty-with-delay"),
    pytest.param(BatchingPolicy(max_batch_size=32),
                 [entry("a", 3, 0.0), entry("b", 2, 0.1), entry("c", 1, 0.2)], 0.2, 1,
                 Send(3), id="delay0-idle-sends-all"),
    pytest.param(BatchingPolicy(max_batch_size=32),
                 [entry("a", 3, 0.0), entry("b", 2, 0.1)], 0.2, 0,
                 Wait(None), id="no-idle-no-deadline"),
    pytest.param(BatchingPolicy(max_batch_size=32),
                 [entry("a", 3, 0.0, deadline=9.0), entry("b", 2, 0.1, deadline=4.0)], 0.2, 0,
                 Wait(4.0), id="no-idle-nearest-deadline"),
    pytest.param(BatchingPolicy(max_batch_size=32, max_queue_delay_us=10**6),
                 [entry("a", 32, 0.0, deadline=7.0)], 0.0, 0,
                 Wait(7.0), id="no-idle-even-when-closed"),
    pytest.param(BatchingPolicy(max_batch_size=32, max_queue_delay_us=10**6),
                 [entry("a", 20, 0.0), entry("b", 20, 0.0)], 0.0, 1,
                 Send(1), id="closed-by-size"),
    pytest.param(BatchingPolicy(max_batch_size=32, max_queue_delay_us=10**6),
                 [entry("a", 16, 0.0), entry("b", 16, 0.0)], 0.0, 1,
                 Send(2), id="exactly-max-rows"),
    pytest.param(BatchingPolicy(max_batch_size=32, max_queue_delay_us=10**6),
                 [entry("a", 8), entry("b", 8), entry("c", 8), entry("d", 16)], 0.0, 1,
                 Send(3), id="rows-counted-not-requests"),
    pytest.param(BatchingPolicy(max_batch_size=32, preferred_batch_sizes=(4, 8),
                                max_queue_delay_us=1000),
                 [entry("a", 1, 0.0), entry("b", 3, 0.0)], 0.0, 1,
                 Send(2), id="preferred-size-reached"),
    pytest.param(BatchingPolicy(max_batch_size=32, preferred_batch_sizes=(4,)),
                 [entry("a", 1, 0.0) for _ in range(10)], 0.0, 1,
                 Send(4), id="preferred-size-formed-from-a-longer-queue"),
    pytest.param(BatchingPolicy(max_batch_size=32, preferred_batch_sizes=(4, 8)),
                 [entry("a", 1, 0.0) for _ in range(7)] + [entry("a", 3, 0.0)], 0.0, 1,
                 Send(4), id="largest-preferred-that-can-be-formed"),
    pytest.param(BatchingPolicy(max_batch_size=32, preferred_batch_sizes=(4, 8)),
                 [entry("a", 2, 0.0) for _ in range(5)], 0.0, 1,
                 Send(4), id="largest-preferred-among-several"),
    # Triton: no preferred size formable, a batch that would pass the largest one goes at
    # once with what stays within it (here one request of 3 rows, not the 6 rows that fit 8).
    pytest.param(BatchingPolicy(max_batch_size=8, preferred_batch_sizes=(4,)),
                 [entry("a", 3, 0.0), entry("a", 3, 0.0), entry("a", 3, 0.0)], 0.0, 1,
                 Send(1), id="no-preferred-formable-what-stays-within-the-largest-goes"),
    pytest.param(BatchingPolicy(max_batch_size=16, preferred_batch_sizes=(4, 8)),
                 [entry("a", 3, 0.0) for _ in range(5)], 0.0, 1,
                 Send(2), id="within-the-largest-preferred-not-up-to-max-batch-size"),
    pytest.param(BatchingPolicy(max_batch_size=8, preferred_batch_sizes=(4,),
                                max_queue_delay_us=10**6),
                 [entry("a", 3, 0.0), entry("b", 3, 0.01)], 0.01, 1,
                 Send(1), id="passing-the-largest-preferred-goes-before-the-delay"),
    pytest.param(BatchingPolicy(max_batch_size=8, preferred_batch_sizes=(4,),
                                max_queue_delay_us=1000),
                 [entry("a", 1, 0.0) for _ in range(6)], 0.0005, 1,
                 Send(4), id="preferred-size-while-the-delay-runs"),
    # Triton: once the queue delay has run out, everything that fits goes, preferred or not.
    pytest.param(BatchingPolicy(max_batch_size=8, preferred_batch_sizes=(4,),
                                max_queue_delay_us=1000),
                 [entry("a", 1, 0.0) for _ in range(6)], 0.001, 1,
                 Send(6), id="delay-run-out-sends-all-that-fits-not-the-preferred"),
    pytest.param(BatchingPolicy(max_batch_size=32, preferred_batch_sizes=(4, 8),
                                max_queue_delay_us=1000),
                 [entry("a", 2, 0.0), entry("b", 3, 0.0)], 0.0, 1,
                 Wait(0.0 + 1000 / 1e6), id="between-preferred-sizes-waits"),
    pytest.param(BatchingPolicy(max_batch_size=32, preferred_batch_sizes=(4, 8),
                                max_queue_delay_us=1000),
                 [entry("a", 9, 0.0)], 0.0005, 1,
                 Send(1), id="above-all-preferred-goes-without-waiting-for-the-delay"),
    pytest.param(BatchingPolicy(max_batch_size=32, max_queue_delay_us=1000),
                 [entry("a", 1, 0.0), entry("b", 1, 0.0008)], 0.0009, 1,
                 Wait(0.001), id="delay-from-oldest-waits"),
    pytest.param(BatchingPolicy(max_batch_size=32, max_queue_delay_us=1000),
                 [entry("a", 1, 0.0), entry("b", 1, 0.0008)], 0.001, 1,
                 Send(2), id="delay-from-oldest-sends"),
    pytest.param(BatchingPolicy(max_batch_size=32, max_queue_delay_us=1000),
                 [entry("a", 1, 0.0, deadline=0.0005), entry("b", 1, 0.0)], 0.0001, 1,
                 Wait(0.0005), id="wait-until-sooner-expiry"),
    pytest.param(BatchingPolicy(max_batch_size=32, max_queue_delay_us=1000),
                 [entry("a", 1, 0.0, deadline=0.5)], 0.0001, 1,
                 Wait(0.001), id="wait-until-sooner-delay"),
    pytest.param(BatchingPolicy(max_batch_size=32, max_queue_delay_us=1000),
                 [entry("a", key="A"), entry("b", key="A"), entry("c", key="B")], 0.0, 1,
                 Send(2), id="shape-change-closes"),
    pytest.param(BatchingPolicy(max_batch_size=0, max_queue_delay_us=1000),
                 [entry("a"), entry("b"), entry("c")], 0.0, 1,
                 Send(1), id="no-batch-dimension"),
]


@pytest.mark.parametrize(("policy", "entries", "now", "idle", "expected"), DECISIONS)
def test_decide(policy, entries, now, idle, expected):
    queue = queue_of(policy, *entries)
    assert queue.expire(now) == []
    assert queue.decide(now, idle) == expected


def test_shape_change_leaves_the_other_shape_queued():
    policy = BatchingPolicy(max_batch_size=32, max_queue_delay_us=1000)
    queue = queue_of(policy, entry("a", key="A"), entry("b", key="A"), entry("c", 2, key="B"))
    assert queue.decide(0.0, 1) == Send(2)
    assert names(queue.take(2)) == ["a", "b"]
    assert (len(queue), queue.rows) == (1, 2)
    assert queue.decide(0.0, 1) == Wait(0.001)
    assert queue.decide(0.001, 1) == Send(1)
    assert names(queue.take(1)) == ["c"]
    assert queue.decide(0.001, 1) == Wait(None)


def test_no_batch_dimension_sends_each_request_alone():
    queue = queue_of(BatchingPolicy(max_batch_size=0), entry("a"), entry("b"), entry("c"))
    sent = []
    while (decision := queue.decide(0.0, 1)) != Wait(None):
        assert decision == Send(1)
        sent.append(names(queue.take(decision.count)))
    assert sent == [["a"], ["b"], ["c"]]


# --- queue size ----------------------------------------------------------------------------

def test_full_queue_refuses_at_once():
    queue = queue_of(BatchingPolicy(max_batch_size=8, max_queue_size=2), entry("a"), entry("b"),
                     label="model 'mlp' version '1'")
    with pytest.raises(ResourceExhausted) as raised:
        queue.add(entry("c"))
    assert raised.value.message == ("queue of model 'mlp' version '1' is full (max_queue_size 2; "
                                    "2 requests / 0 bytes); retry after 0.05 s")
    assert raised.value.retry_after == 0.05
    assert "max_queue_size" in str(raised.value)
    assert len(queue) == 2
    assert names(queue.take(5)) == ["a", "b"]


def test_queue_size_zero_is_unbounded():
    queue = queue_of(BatchingPolicy(max_batch_size=8), *(entry(str(i)) for i in range(100)))
    assert (len(queue), queue.rows) == (100, 100)


def test_frees_room_after_take():
    queue = queue_of(BatchingPolicy(max_batch_size=8, max_queue_size=1), entry("a"))
    assert names(queue.take(1)) == ["a"]
    queue.add(entry("b"))
    assert len(queue) == 1


@pytest.mark.parametrize("rows", [0, 9])
def test_rows_outside_batch_cap_rejected(rows):
    queue = BatchQueue(BatchingPolicy(max_batch_size=8))
    with pytest.raises(InvalidArgument, match="max_batch_size 8"):
        queue.add(entry("a", rows))
    assert (len(queue), queue.rows) == (0, 0)


# --- expiry --------------------------------------------------------------------------------

@pytest.mark.parametrize(("timeout_us", "given"), [(0, None), (0, 5.0), (2000, None),
                                                  (2000, 5.0), (2000, 1.001)])
def test_queue_timeout_bounds_the_wait_not_the_callers_deadline(timeout_us, given):
    """Triton's queue timeout bounds the wait for a batch; the request's deadline (what bounds
    its compute call) stays the caller's."""
    queue = BatchQueue(BatchingPolicy(max_batch_size=8, default_timeout_us=timeout_us))
    item = entry("a", at=1.0, deadline=given)
    queue.add(item)
    assert item.deadline == given
    if timeout_us:
        assert item.timeout_at == pytest.approx(1.002, abs=1e-12)
    else:
        assert item.timeout_at is None


def test_a_sent_request_keeps_no_queue_timeout_as_its_deadline():
    """A model slower than its queue timeout is served: the timeout is over once a request
    leaves the queue (it bounded the compute call, so every request failed)."""
    queue = queue_of(BatchingPolicy(max_batch_size=8, default_timeout_us=200_000),
                     entry("a", at=0.0))
    assert queue.decide(0.0, 1) == Send(1)
    [sent] = queue.take(1)
    assert sent.deadline is None


def test_expire_returns_exactly_the_expired():
    policy = BatchingPolicy(max_batch_size=8, default_timeout_us=3_000_000, priority_levels=2)
    queue = queue_of(
        policy,
        entry("timed-out", 2, at=0.0),  # queue timeout -> 3.0
        entry("own-deadline", 1, at=1.0, deadline=2.0),
        entry("later", 3, at=1.0, deadline=9.0),  # queue timeout -> 4.0
        entry("urgent-expired", 1, at=1.0, deadline=2.5, priority=1),
        entry("fresh", 1, at=2.5),  # queue timeout -> 5.5
    )
    assert queue.expire(1.9) == []
    assert names(queue.expire(2.0)) == ["own-deadline"]
    assert names(queue.expire(3.0)) == ["urgent-expired", "timed-out"]
    assert (len(queue), queue.rows) == (2, 4)
    assert queue.decide(3.0, 0) == Wait(4.0)
    assert names(queue.take(2)) == ["later", "fresh"]


def test_expiry_names_the_deadline_or_the_queue_timeout():
    policy = BatchingPolicy(max_batch_size=8, default_timeout_us=1000, priority_levels=2,
                            default_priority_level=2)
    queue = queue_of(policy, entry("caller", at=0.0, deadline=0.0005),
                     entry("queue", at=0.0, priority=1))
    expired = {item.payload: item for item in queue.expire(0.001)}
    late, timed_out = expired["caller"], expired["queue"]
    assert queue.expiry(late, 0.001).message == (
        "deadline exceeded while queued for a batch (never computed)")
    error = queue.expiry(timed_out, 0.001)
    assert (error.code, error.message) == ("UNAVAILABLE", (  # Triton's code for it
        "queue timeout expired: waited longer than the default_timeout_microseconds 1000 of "
        "priority level 1 for a batch (never computed)"))


DELAYING = BatchingPolicy(max_batch_size=1, default_timeout_us=1000, default_delays=True)


def test_delay_action_keeps_a_timed_out_request_behind_the_others():
    """timeout_action DELAY: past its queue timeout a request is not refused; it waits
    until the requests of its level that have not timed out are sent."""
    queue = queue_of(DELAYING, entry("old", at=0.0), entry("new", at=0.0008))
    assert queue.expire(0.0012) == []
    assert (len(queue), queue.rows) == (2, 2)
    queue.add(entry("newest", at=0.0013))
    order = []
    while queue.decide(0.0013, 1) == Send(1):
        order.extend(names(queue.take(1)))
    assert order == ["new", "newest", "old"]


def test_delay_action_wakes_at_the_timeout_and_keeps_the_callers_deadline():
    queue = queue_of(DELAYING, entry("a", at=0.0, deadline=0.005), entry("b", at=0.0))
    assert queue.decide(0.0, 0) == Wait(0.001)  # the timeout reorders: decide again then
    assert queue.expire(0.001) == []
    assert queue.decide(0.001, 0) == Wait(0.005)
    assert names(queue.expire(0.005)) == ["a"]  # delayed, yet its caller gave up
    assert names(queue.take(5)) == ["b"]


def test_delayed_requests_stay_ahead_of_less_urgent_levels():
    policy = BatchingPolicy(max_batch_size=1, priority_levels=2, default_priority_level=2,
                            level_policies=((1, QueuePolicy(timeout_us=1000, delay=True)),))
    queue = queue_of(policy, entry("urgent-old", at=0.0, priority=1),
                     entry("urgent-new", at=0.0015, priority=1), entry("low", at=0.0))
    assert queue.expire(0.002) == []
    assert names(queue.take(3)) == ["urgent-new", "urgent-old", "low"]


def test_each_level_follows_its_own_queue_policy():
    """priority_queue_policy: level 1 times out and refuses as its own policy says; level 2
    follows default_queue_policy."""
    policy = BatchingPolicy(max_batch_size=8, priority_levels=2, default_priority_level=2,
                            max_queue_size=10, default_timeout_us=5000,
                            level_policies=((1, QueuePolicy(max_queue_size=1,
                                                            timeout_us=1000)),))
    queue = queue_of(policy, entry("urgent", at=0.0, priority=1), entry("plain", at=0.0),
                     label="model 'm' version '1'")
    with pytest.raises(ResourceExhausted) as refused:
        queue.add(entry("urgent2", at=0.0, priority=1))
    assert refused.value.message == (
        "queue of model 'm' version '1' is full at priority level 1 (max_queue_size 1 of its "
        "priority_queue_policy; 1 requests at that level); retry after 0.05 s")
    queue.add(entry("plain2", at=0.0))  # level 2 has room
    assert names(queue.expire(0.001)) == ["urgent"]
    assert queue.expire(0.004) == []
    assert names(queue.expire(0.005)) == ["plain", "plain2"]


def fits(queue, priority, most=100):
    """How many requests of `priority` the queue takes before it refuses one or sheds."""
    for n in range(most):
        try:
            if queue.add(entry(f"{priority}-{n}", priority=priority)):
                return n
        except ResourceExhausted:
            return n
    return most


@pytest.mark.parametrize(
    ("levels", "low", "urgent"),
    [
        pytest.param({}, 4, 0, id="default-only-sheds-for-urgent"),
        pytest.param({1: 1}, 4, 0, id="a-smaller-urgent-level"),
        pytest.param({1: 6}, 4, 2, id="a-larger-urgent-level-widens-the-queue"),
        pytest.param({1: 0}, 4, 100, id="an-unbounded-urgent-level"),
    ],
)
def test_each_level_holds_its_own_bound_and_the_queue_its_largest(levels, low, urgent):
    """Default max_queue_size 4 (level 2) and level 1's own from priority_queue_policy: the
    low level fills to 4; then urgent requests fit without shedding while the whole queue
    is under its largest level's bound."""
    policy = BatchingPolicy(max_batch_size=8, priority_levels=2, default_priority_level=2,
                            max_queue_size=4, level_policies=tuple(
                                (level, QueuePolicy(max_queue_size=size))
                                for level, size in levels.items()))
    queue = BatchQueue(policy)
    assert fits(queue, 2) == low
    assert fits(queue, 1) == urgent


# --- priorities ----------------------------------------------------------------------------

PRIORITY = BatchingPolicy(max_batch_size=1, priority_levels=3, default_priority_level=2)


@pytest.mark.parametrize(
    ("given", "level"),
    [(0, 2), (1, 1), (2, 2), (3, 3), (4, 2), (7, 2), (-1, 2)],
)
def test_a_priority_past_the_levels_is_the_default_level_as_in_triton(given, level):
    queue = BatchQueue(PRIORITY)
    item = entry("a", priority=given)
    queue.add(item)
    assert item.priority == level


@pytest.mark.parametrize(
    ("policy", "given", "level"),
    [
        (BatchingPolicy(max_batch_size=1), 0, 1),
        (BatchingPolicy(max_batch_size=1), 5, 1),
        (BatchingPolicy(max_batch_size=1, priority_levels=4), 0, 4),
    ],
)
def test_priority_single_level_and_missing_default(policy, given, level):
    assert policy.level_of(given) == level


def test_urgent_later_request_goes_first():
    queue = queue_of(
        PRIORITY,
        entry("early-low", at=0.0, priority=2),
        entry("early-default", at=0.1, priority=0),
        entry("late-high", at=0.2, priority=1),
        entry("lowest", at=0.3, priority=9),
    )
    order = []
    while queue.decide(1.0, 1) == Send(1):
        order.extend(names(queue.take(1)))
    assert order == ["late-high", "early-low", "early-default", "lowest"]


def test_batch_spans_priority_levels_in_queue_order():
    policy = BatchingPolicy(max_batch_size=8, priority_levels=2)
    queue = queue_of(policy, entry("low", 2, priority=2), entry("high", 3, priority=1))
    assert queue.decide(0.0, 1) == Send(2)
    assert names(queue.take(2)) == ["high", "low"]
    assert (len(queue), queue.rows) == (0, 0)


# --- from_config ---------------------------------------------------------------------------

FULL_CONFIG = """
name: "mlp"
max_batch_size: 32
dynamic_batching {
  preferred_batch_size: [4, 8]
  max_queue_delay_microseconds: 500
  priority_levels: 3
  default_priority_level: 2
  default_queue_policy { max_queue_size: 64 default_timeout_microseconds: 2000 }
}
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(FULL_CONFIG, BatchingPolicy(
            max_batch_size=32, preferred_batch_sizes=(4, 8), max_queue_delay_us=500,
            max_queue_size=64, default_timeout_us=2000, priority_levels=3,
            default_priority_level=2), id="full"),
        pytest.param('name: "mlp" max_batch_size: 16',
                     BatchingPolicy(max_batch_size=16, merges=False), id="no-dynamic-batching"),
        pytest.param('name: "mlp" max_batch_size: 16 dynamic_batching {}',
                     BatchingPolicy(max_batch_size=16), id="empty-dynamic-batching"),
        pytest.param('name: "plain"', BatchingPolicy(max_batch_size=0, merges=False),
                     id="no-batch-dimension"),
        pytest.param(
            'max_batch_size: 16 dynamic_batching { priority_levels: 2 default_priority_level: 2 '
            'default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 10 } '
            'priority_queue_policy { key: 1 value { max_queue_size: 4 } } }',
            BatchingPolicy(max_batch_size=16, default_timeout_us=10, priority_levels=2,
                           default_priority_level=2, default_delays=True,
                           level_policies=((1, QueuePolicy(max_queue_size=4)),)),
            id="queue-policies"),
    ],
)
def test_from_config(text, expected):
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert BatchingPolicy.from_config(config) == expected


def test_from_config_message_built_directly():
    config = model_config_pb2.ModelConfig(name="mlp", max_batch_size=4)
    config.dynamic_batching.preferred_batch_size.append(4)
    assert BatchingPolicy.from_config(config) == BatchingPolicy(
        max_batch_size=4, preferred_batch_sizes=(4,))


def test_without_dynamic_batching_each_request_is_a_batch_of_its_own_sent_when_idle():
    """As Triton's default scheduler: requests are never merged, and one goes as soon as a
    replica is idle."""
    config = model_config_pb2.ModelConfig(name="mlp", max_batch_size=16)
    queue = queue_of(BatchingPolicy.from_config(config), entry("a", 2, 0.0), entry("b", 3, 0.0))
    assert queue.decide(0.0, 0) == Wait(None)
    assert queue.decide(0.0, 1) == Send(1)
    assert names(queue.take(1)) == ["a"]
    assert queue.decide(0.0, 1) == Send(1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_batch_size: 8 dynamic_batching { preferred_batch_size: [4, 16] }",
         "preferred_batch_size 16 must be between 1 and max_batch_size 8"),
        ("max_batch_size: 8 dynamic_batching { preferred_batch_size: [0] }",
         "preferred_batch_size 0 must be between 1 and max_batch_size 8"),
        ("max_batch_size: 0 dynamic_batching { preferred_batch_size: [1] }",
         "preferred_batch_size 1 must be between 1 and max_batch_size 0"),
    ],
)
def test_from_config_rejects_bad_preferred_size(text, message):
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    with pytest.raises(InvalidArgument) as raised:
        BatchingPolicy.from_config(config)
    assert raised.value.message == message
