"""The batcher checks every request against the model's configuration again, so a request
the router should not have sent is refused on its own instead of spoiling its batch."""

import asyncio

import pytest

from meshserve.batcher.policy import BatchingPolicy, BatchQueue
from meshserve.batcher.scheduler import Replica, Scheduler
from meshserve.batcher.service import Batcher
from meshserve.common.statistics import Statistics
from meshserve.protocol.groups_pb2 import GroupItem, InferGroup, InferGroupResult
from tests.unit.test_batch import one_input_config, request
from tests.unit.test_tracing import FakeCompute


@pytest.mark.parametrize(("spoil", "message"), [
    (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 13),
     "raw_input_contents holds 13 bytes"),
    (lambda r: r.inputs[0].ClearField("shape"), "input 'A'"),
    (lambda r: setattr(r.inputs[0], "name", "Z"), "unknown input 'Z'"),
])
async def test_a_malformed_request_is_refused_alone_and_spoils_no_batch(spoil, message):
    """The batcher validates again: the malformed request gets INVALID_ARGUMENT naming what
    is wrong; the good ones of the same group are batched and answered."""
    bad = request("bad", 1, base=50)
    spoil(bad)
    config = one_input_config()
    compute, statistics = FakeCompute(), Statistics(name="m", version="1")
    scheduler = Scheduler(BatchQueue(BatchingPolicy.from_config(config), "m"),
                          [Replica(compute)], config, "1", statistics)
    batcher = Batcher(scheduler, statistics, config)
    loop = asyncio.create_task(scheduler.run())
    try:
        results = await batcher.infer([GroupItem(request=request("a", 1)),
                                       GroupItem(request=bad),
                                       GroupItem(request=request("b", 2, base=10))])
    finally:
        loop.cancel()
        await scheduler.close()
    assert [r.code for r in results] == [0, 3, 0]
    assert message in results[1].message
    assert [list(r.response.outputs[0].shape) for r in (results[0], results[2])] == [[1, 2],
                                                                                   [2, 2]]


async def test_refused_requests_are_answered_early_and_the_rest_by_position():
    """With an early channel, the batcher answers what it refused at once (before any compute)
    and the group's last answer lists the positions of the rest."""
    bad = request("bad", 1, base=50)
    bad.raw_input_contents[0] = b"\0" * 13
    config = one_input_config()
    compute, statistics = FakeCompute(), Statistics(name="m", version="1")
    scheduler = Scheduler(BatchQueue(BatchingPolicy.from_config(config), "m"),
                          [Replica(compute)], config, "1", statistics)
    batcher = Batcher(scheduler, statistics, config)
    early: list[InferGroupResult] = []

    async def heard(partial: bytes) -> None:
        assert compute.traceparents == []  # before any batch ran
        early.append(InferGroupResult.FromString(partial))

    group = InferGroup(model_name="m", items=[GroupItem(request=request("a", 1)),
                                              GroupItem(request=bad),
                                              GroupItem(request=request("b", 2, base=10))])
    loop = asyncio.create_task(scheduler.run())
    try:
        last = InferGroupResult.FromString(await batcher.handle(group.SerializeToString(),
                                                                heard))
    finally:
        loop.cancel()
        await scheduler.close()
    [partial] = early
    assert list(partial.items) == [1] and [r.code for r in partial.results] == [3]
    assert list(last.items) == [0, 2] and [r.code for r in last.results] == [0, 0]


async def test_a_python_models_request_may_not_set_the_parameter_describing_batches():
    """A Python model's batches say whose rows they hold under `meshserve_requests`; a request
    that sets it is refused alone, whether or not it would have shared a batch."""
    config = one_input_config()
    config.backend = "python"
    forged = request("forged", 1, base=50)
    forged.parameters["meshserve_requests"].string_param = "[]"
    compute, statistics = FakeCompute(), Statistics(name="m", version="1")
    scheduler = Scheduler(BatchQueue(BatchingPolicy.from_config(config), "m"),
                          [Replica(compute)], config, "1", statistics)
    batcher = Batcher(scheduler, statistics, config)
    loop = asyncio.create_task(scheduler.run())
    try:
        results = await batcher.infer([GroupItem(request=request("a", 1)),
                                       GroupItem(request=forged)])
        [alone] = await batcher.infer([GroupItem(request=forged)])
    finally:
        loop.cancel()
        await scheduler.close()
    assert [r.code for r in results] == [0, 3]
    assert alone.code == 3 and alone.message == (
        "parameter 'meshserve_requests' is reserved: meshserve describes a batch's requests "
        "with it")
