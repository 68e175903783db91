"""The batcher checks every request against the model's configuration again, so a request
the router should not have sent is refused on its own instead of spoiling its batch."""

import asyncio

import pytest

from meshserve.batcher.policy import BatchingPolicy, BatchQueue
from meshserve.batcher.scheduler import Replica, Scheduler
from meshserve.batcher.service import Batcher
from meshserve.batcher.statistics import Statistics
from meshserve.protocol.groups_pb2 import GroupItem
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
