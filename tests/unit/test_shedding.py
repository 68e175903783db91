"""Priority shedding and byte budgets of the batcher's queue: table-driven, no clock needed."""

import pytest

from meshserve.batcher.policy import BatchingPolicy, BatchQueue, Pending, QueueFull


def entry(name, priority=0, size=0, rows=1):
    return Pending(key="A", rows=rows, enqueued=0.0, deadline=None, priority=priority,
                   payload=name, size=size)


def names(entries):
    return [item.payload for item in entries]


def fill(policy, *entries):
    queue = BatchQueue(policy, label="model 'm' version '1'")
    for item in entries:
        assert queue.add(item) == []
    return queue


TWO_LEVELS = dict(max_batch_size=8, priority_levels=2, default_priority_level=2)
THREE_LEVELS = dict(max_batch_size=8, priority_levels=3, default_priority_level=2)

# (policy, queued, arrival, shed names, queue order after, or the refusal's reason)
SHEDDING = [
    pytest.param(BatchingPolicy(**TWO_LEVELS, max_queue_size=3),
                 [entry("a", 1), entry("b", 2)], entry("c", 2),
                 [], ["a", "b", "c"], id="room-left-nothing-shed"),
    pytest.param(BatchingPolicy(**TWO_LEVELS, max_queue_size=2),
                 [entry("low1", 2), entry("low2", 2)], entry("high", 1),
                 ["low2"], ["high", "low1"], id="count-full-urgent-evicts-newest-low"),
    pytest.param(BatchingPolicy(**TWO_LEVELS, max_queue_size=2),
                 [entry("low1", 2), entry("low2", 0)], entry("high", 1),
                 ["low2"], ["high", "low1"], id="priority-0-is-the-default-low-level"),
    pytest.param(BatchingPolicy(**TWO_LEVELS, max_queue_size=2),
                 [entry("low1", 2), entry("low2", 2)], entry("low3", 2),
                 "queue_full", ["low1", "low2"], id="count-full-least-urgent-refused"),
    pytest.param(BatchingPolicy(**TWO_LEVELS, max_queue_size=2),
                 [entry("high1", 1), entry("high2", 1)], entry("high3", 1),
                 "queue_full", ["high1", "high2"], id="count-full-of-urgent-refused"),
    pytest.param(BatchingPolicy(**THREE_LEVELS, max_queue_size=3),
                 [entry("l3", 3), entry("l2", 2), entry("l3b", 3)], entry("l1", 1),
                 ["l3b"], ["l1", "l2", "l3"], id="least-urgent-level-first"),
    pytest.param(BatchingPolicy(**THREE_LEVELS, max_queue_size=2),
                 [entry("l1", 1), entry("l2", 2)], entry("l1b", 1),
                 ["l2"], ["l1", "l1b"], id="middle-level-shed-for-top"),
    pytest.param(BatchingPolicy(**THREE_LEVELS, max_queue_size=2),
                 [entry("l1", 1), entry("l2", 2)], entry("l2b", 2),
                 "queue_full", ["l1", "l2"], id="equal-level-never-shed"),
    pytest.param(BatchingPolicy(**TWO_LEVELS, max_queue_bytes=100),
                 [entry("low1", 2, 40), entry("low2", 2, 40)], entry("high", 1, 30),
                 ["low2"], ["high", "low1"], id="bytes-full-one-eviction-enough"),
    pytest.param(BatchingPolicy(**TWO_LEVELS, max_queue_bytes=100),
                 [entry("low1", 2, 40), entry("low2", 2, 40)], entry("high", 1, 70),
                 ["low2", "low1"], ["high"], id="bytes-full-two-evictions"),
    pytest.param(BatchingPolicy(**TWO_LEVELS, max_queue_bytes=100),
                 [entry("high1", 1, 50), entry("low", 2, 40)], entry("high2", 1, 70),
                 "bytes", ["high1", "low"], id="bytes-evicting-all-low-not-enough-sheds-none"),
    pytest.param(BatchingPolicy(**TWO_LEVELS, max_queue_bytes=100),
                 [entry("low1", 2, 60)], entry("low2", 2, 50),
                 "bytes", ["low1"], id="bytes-full-least-urgent-refused"),
    pytest.param(BatchingPolicy(**TWO_LEVELS, max_queue_bytes=100),
                 [], entry("huge", 1, 101),
                 "bytes", [], id="larger-than-budget-refused"),
    pytest.param(BatchingPolicy(**TWO_LEVELS, max_queue_size=2, max_queue_bytes=100),
                 [entry("low1", 2, 10), entry("low2", 2, 80)], entry("high", 1, 5),
                 ["low2"], ["high", "low1"], id="count-and-bytes-both-limits"),
    pytest.param(BatchingPolicy(max_batch_size=8, max_queue_size=1),
                 [entry("a", 1)], entry("b", 1),
                 "queue_full", ["a"], id="single-level-refuses"),
]


@pytest.mark.parametrize("policy, queued, arrival, expected, order", SHEDDING)
def test_shedding_order(policy, queued, arrival, expected, order):
    queue = fill(policy, *queued)
    before = (len(queue), queue.bytes)
    if isinstance(expected, str):
        with pytest.raises(QueueFull) as refused:
            queue.add(arrival, retry_after=lambda: 0.2)
        assert refused.value.reason == expected
        assert refused.value.code == "RESOURCE_EXHAUSTED"
        assert refused.value.retry_after == 0.2
        assert refused.value.message.endswith("; retry after 0.2 s")
        assert (len(queue), queue.bytes) == before
    else:
        shed = queue.add(arrival, retry_after=lambda: 0.2)
        assert names(s.entry for s in shed) == expected
        assert all(s.error.reason == "priority" and s.error.retry_after == 0.2 for s in shed)
        assert queue.bytes == before[1] + arrival.size - sum(s.entry.size for s in shed)
    assert len(queue) == len(order)
    assert names(queue.take(len(queue))) == order


def test_messages_name_the_limit_and_occupancy():
    policy = BatchingPolicy(**TWO_LEVELS, max_queue_size=2, max_queue_bytes=1000)
    queue = fill(policy, entry("low1", 2, 10), entry("low2", 2, 20))
    [shed] = queue.add(entry("high", 1, 5), retry_after=lambda: 0.05)
    assert shed.error.message == (
        "shed: queue of model 'm' version '1' full (2 requests / 30 bytes) and a more urgent "
        "request arrived; retry after 0.05 s")
    with pytest.raises(QueueFull) as refused:
        queue.add(entry("low3", 2, 1))
    assert refused.value.message == (
        "queue of model 'm' version '1' is full (max_queue_size 2; 2 requests / 15 bytes); "
        "retry after 0.05 s")
    with pytest.raises(QueueFull) as huge:
        queue.add(entry("huge", 1, 2000))
    assert huge.value.message == (
        "request of 2000 bytes for queue of model 'm' version '1' exceeds max_queue_bytes 1000"
        "; retry after 0.05 s")


def test_bytes_held_until_released_after_take():
    queue = fill(BatchingPolicy(**TWO_LEVELS, max_queue_bytes=100), entry("a", 2, 60))
    taken = queue.take(1)
    assert (len(queue), queue.bytes) == (0, 60)  # in flight still counts
    with pytest.raises(QueueFull):  # nothing queued to shed: in-flight bytes are not shed
        queue.add(entry("b", 1, 50))
    queue.release(taken)
    assert queue.bytes == 0
    assert queue.add(entry("b", 1, 50)) == []


def test_expired_entries_free_their_bytes():
    queue = BatchQueue(BatchingPolicy(max_batch_size=8, max_queue_bytes=100))
    queue.add(Pending(key="A", rows=1, enqueued=0.0, deadline=1.0, payload="x", size=70))
    assert queue.bytes == 70
    assert names(queue.expire(1.0)) == ["x"]
    assert (len(queue), queue.bytes) == (0, 0)

