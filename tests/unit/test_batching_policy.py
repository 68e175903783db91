"""Table-driven tests of the dynamic batcher's pure decisions; the clock is a plain float."""

import pytest
from google.protobuf import text_format

from meshserve.batcher.policy import BatchingPolicy, BatchQueue, Pending, Send, Wait
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
    pytest.param(BatchingPolicy(max_batch_size=8, preferred_batch_sizes=(4,)),
                 [entry("a", 3, 0.0), entry("a", 3, 0.0), entry("a", 3, 0.0)], 0.0, 1,
                 Send(2), id="no-preferred-formable-closed-batch-goes"),
    pytest.param(BatchingPolicy(max_batch_size=32, preferred_batch_sizes=(4, 8),
                                max_queue_delay_us=1000),
                 [entry("a", 2, 0.0), entry("b", 3, 0.0)], 0.0, 1,
                 Wait(0.0 + 1000 / 1e6), id="between-preferred-sizes-waits"),
    pytest.param(BatchingPolicy(max_batch_size=32, preferred_batch_sizes=(4, 8),
                                max_queue_delay_us=1000),
                 [entry("a", 9, 0.0)], 0.0005, 1,
                 Wait(0.001), id="above-all-preferred-waits-for-delay"),
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

@pytest.mark.parametrize(
    ("timeout_us", "given", "expected"),
    [
        (0, None, None),
        (0, 5.0, 5.0),
        (2000, None, 1.002),
        (2000, 5.0, 1.002),
        (2000, 1.001, 1.001),
    ],
)
def test_queue_timeout_and_request_deadline_sooner_wins(timeout_us, given, expected):
    queue = BatchQueue(BatchingPolicy(max_batch_size=8, default_timeout_us=timeout_us))
    item = entry("a", at=1.0, deadline=given)
    queue.add(item)
    if expected is None:
        assert item.deadline is None
    else:
        assert item.deadline == pytest.approx(expected, abs=1e-12)


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
                     BatchingPolicy(max_batch_size=16), id="no-dynamic-batching"),
        pytest.param('name: "mlp" max_batch_size: 16 dynamic_batching {}',
                     BatchingPolicy(max_batch_size=16), id="empty-dynamic-batching"),
        pytest.param('name: "plain"', BatchingPolicy(max_batch_size=0), id="no-batch-dimension"),
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


def test_no_dynamic_batching_is_work_conserving():
    config = model_config_pb2.ModelConfig(name="mlp", max_batch_size=16)
    queue = queue_of(BatchingPolicy.from_config(config), entry("a", 2, 0.0), entry("b", 3, 0.0))
    assert queue.decide(0.0, 0) == Wait(None)
    assert queue.decide(0.0, 1) == Send(2)


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
