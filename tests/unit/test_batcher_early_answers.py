"""A group that spans several batches is answered batch by batch: each batch's requests go
back as soon as it is done, so the hop that sent the group can send the next one while the
model still works through the rest."""

import asyncio

from meshserve.batcher.policy import BatchingPolicy, BatchQueue
from meshserve.batcher.scheduler import Replica, Scheduler
from meshserve.batcher.service import Batcher
from meshserve.common.statistics import Statistics
from meshserve.protocol.groups_pb2 import GroupItem, InferGroup, InferGroupResult
from tests.unit.test_batch import one_input_config, request
from tests.unit.test_tracing import FakeCompute


class GatedCompute(FakeCompute):
    """Answers each batch once the test lets it: `ran` holds each batch's request ids."""

    def __init__(self) -> None:
        super().__init__()
        self.ran: list[list[str]] = []
        self.gates: list[asyncio.Event] = []
        self.arrived = asyncio.Queue()

    async def send(self, body: list[bytes], timeout=None, resend=True, early=None) -> bytes:
        [item] = InferGroup.FromString(b"".join(body)).items
        self.ran.append([item.request.id])
        gate = asyncio.Event()
        self.gates.append(gate)
        self.arrived.put_nowait(len(self.gates) - 1)
        await gate.wait()
        return await super().send(body, timeout, resend)


async def answered_in_parts(max_batch_size: int, rows: list[int], capacity: int = 2,
                            preferred: tuple[int, ...] = ()):
    """The early answers and the last answer of one group of requests with `rows` rows each,
    batch after batch on a gated compute that takes `capacity` batches at a time (the model
    preferring batches of `preferred` rows)."""
    config = one_input_config()
    config.max_batch_size = max_batch_size
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    compute, statistics = GatedCompute(), Statistics(name="m", version="1")
    scheduler = Scheduler(BatchQueue(BatchingPolicy.from_config(config), "m"),
                          [Replica(compute, capacity=capacity)], config, "1", statistics)
    batcher = Batcher(scheduler, statistics, config)
    early: list[InferGroupResult] = []
    heard = asyncio.Queue()

    async def tell(partial: bytes) -> None:
        early.append(InferGroupResult.FromString(partial))
        if early[-1].results:  # (one without results comes as the group leaves the queue)
            heard.put_nowait(sum(1 for answer in early if answer.results))

    group = InferGroup(model_name="m", items=[
        GroupItem(request=request(f"r{i}", n, base=10 * i)) for i, n in enumerate(rows)])
    loop = asyncio.create_task(scheduler.run())
    try:
        handled = asyncio.create_task(batcher.handle(group.SerializeToString(), tell))
        while not handled.done():
            batch = await asyncio.wait_for(compute.arrived.get(), 2)
            compute.gates[batch].set()  # the batches after it still wait their turn
            told = asyncio.create_task(heard.get())
            await asyncio.wait([told, handled], timeout=2, return_when="FIRST_COMPLETED")
            if not told.done():
                told.cancel()
            else:
                assert told.result() == batch + 1  # this batch's answer, at once
        last = InferGroupResult.FromString(await asyncio.wait_for(handled, 2))
    finally:
        loop.cancel()
        await scheduler.close()
    return early, last, compute


async def test_each_batch_of_a_group_is_answered_as_soon_as_it_is_done():
    early, last, compute = await answered_in_parts(2, [2, 1, 2], capacity=1)
    assert compute.ran == [["r0"], ["r1"], ["r2"]]  # 1 + 2 rows exceed max_batch_size 2
    assert [list(partial.items) for partial in early] == [[0], [1]]
    assert list(last.items) == [2]
    shapes = [list(r.response.outputs[0].shape) for p in (*early, last) for r in p.results]
    assert shapes == [[2, 2], [1, 2], [2, 2]]
    assert all(r.code == 0 for p in (*early, last) for r in p.results)


async def test_a_group_answered_by_one_batch_comes_back_in_one_answer():
    """Compute still has room after the group's batch left, so nothing is said early."""
    early, last, compute = await answered_in_parts(8, [2, 1, 3])
    assert early == []
    assert not last.items and len(last.results) == 3  # every item, in order
    assert [list(r.response.outputs[0].shape) for r in last.results] == [[2, 2], [1, 2], [3, 2]]


async def test_a_group_taken_whole_by_a_full_compute_says_so_before_its_results():
    """The group's last request went to the only replica, which has room for no more: an
    early answer without results says so at once, so the hop before can send its next group
    while this one runs; the results come in the last answer."""
    early, last, compute = await answered_in_parts(8, [2, 1, 3], capacity=1)
    assert len(compute.ran) == 1  # one batch for the whole group
    assert early == [InferGroupResult()]
    assert not last.items and len(last.results) == 3
    assert all(r.code == 0 for r in last.results)


async def test_a_group_that_leaves_whole_in_a_preferred_batch_says_so_before_its_results():
    """Compute still has room, but the model prefers batches of 6 and the group made one:
    the hop before may send its next group now, to be the next batch."""
    early, last, compute = await answered_in_parts(8, [2, 1, 3], preferred=(6,))
    assert len(compute.ran) == 1
    assert early == [InferGroupResult()]
    assert not last.items and len(last.results) == 3


async def test_a_group_over_several_preferred_batches_waits_for_its_first_answer():
    """Batches of the preferred size, but none holds the whole group: nothing is said before
    the first batch's results."""
    early, last, compute = await answered_in_parts(2, [1, 1, 1, 1], capacity=3, preferred=(2,))
    assert len(compute.ran) == 2  # two batches of two rows
    assert [list(partial.items) for partial in early] == [[0, 1]]
    assert list(last.items) == [2, 3]


class RowsCompute(FakeCompute):
    """Answers at once; `rows` holds each batch's rows."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    async def send(self, body: list[bytes], timeout=None, resend=True, early=None) -> bytes:
        [item] = InferGroup.FromString(b"".join(body)).items
        self.rows.append(item.request.inputs[0].shape[0])
        return await super().send(body, timeout, resend)


def one_item(name: str) -> bytes:
    return InferGroup(model_name="m", items=[GroupItem(request=request(name, 1))]
                      ).SerializeToString()


def telling_batcher(config, replicas: list[Replica]):
    """A batcher of `config` over `replicas`, and the early answers it tells: (scheduler,
    batcher, the queue of answers told, the `early` callback that fills it)."""
    statistics = Statistics(name="m", version="1")
    scheduler = Scheduler(BatchQueue(BatchingPolicy.from_config(config), "m"), replicas,
                          config, "1", statistics)
    told: asyncio.Queue = asyncio.Queue()

    async def tell(partial: bytes) -> None:
        told.put_nowait(InferGroupResult.FromString(partial))

    return scheduler, Batcher(scheduler, statistics, config), told, tell


async def test_a_group_waiting_for_the_queue_delay_lets_the_next_group_come_and_join_it():
    """With max_queue_delay_microseconds the batch waits for more requests, and the hop
    before holds its next group until this one is answered: unless told at once, no request
    could ever join the batch (each waited out the whole delay alone). As in Triton, two
    requests of a model preferring batches of 2 go together, long before the delay."""
    config = one_input_config()
    config.dynamic_batching.max_queue_delay_microseconds = 30_000_000
    config.dynamic_batching.preferred_batch_size.append(2)
    compute = RowsCompute()
    scheduler, batcher, told, tell = telling_batcher(config, [Replica(compute)])
    loop = asyncio.create_task(scheduler.run())
    try:
        first = asyncio.create_task(batcher.handle(one_item("a"), tell))
        assert await asyncio.wait_for(told.get(), 2) == InferGroupResult()
        second = await asyncio.wait_for(batcher.handle(one_item("b"), tell), 2)
        answers = [InferGroupResult.FromString(a) for a in
                   (await asyncio.wait_for(first, 2), second)]
    finally:
        loop.cancel()
        await scheduler.close()
    assert compute.rows == [2]
    assert [[r.code for r in a.results] for a in answers] == [[0], [0]]


async def test_a_group_that_leaves_a_replica_idle_lets_the_next_group_start_there():
    """Two compute replicas (instance_group count 2): the first group's batch runs on one,
    and the hop before is told at once, so the next request runs on the other in parallel
    instead of waiting for the first batch to finish."""
    config = one_input_config()
    computes = [GatedCompute(), GatedCompute()]
    scheduler, batcher, told, tell = telling_batcher(
        config, [Replica(c, capacity=2) for c in computes])
    loop = asyncio.create_task(scheduler.run())
    try:
        first = asyncio.create_task(batcher.handle(one_item("a"), tell))
        assert await asyncio.wait_for(told.get(), 2) == InferGroupResult()
        second = asyncio.create_task(batcher.handle(one_item("b"), None))
        await asyncio.wait_for(computes[1].arrived.get(), 2)  # while "a" still runs
        assert [c.ran for c in computes] == [[["a"]], [["b"]]]
        for compute in computes:
            compute.gates[0].set()
        await asyncio.wait_for(asyncio.gather(first, second), 2)
    finally:
        loop.cancel()
        await scheduler.close()
    assert told.empty()
