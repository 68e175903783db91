"""A group whose items do not parse reaches the batcher (the router reads only a group's head):
each of its items is answered INVALID_ARGUMENT and the stream it came on goes on; a group
whose head does not read either ends the stream with INVALID_ARGUMENT."""

import pytest

from meshserve.batcher.policy import BatchingPolicy, BatchQueue
from meshserve.batcher.scheduler import Replica, Scheduler
from meshserve.batcher.service import Batcher
from meshserve.common import wire
from meshserve.common.errors import InvalidArgument
from meshserve.common.statistics import Statistics
from meshserve.protocol.groups_pb2 import GroupItem, InferGroup, InferGroupResult
from tests.unit.test_batch import one_input_config, request
from tests.unit.test_tracing import FakeCompute

INVALID_ARGUMENT = 3


def batcher() -> Batcher:
    config = one_input_config()
    statistics = Statistics(name="m", version="1")
    scheduler = Scheduler(BatchQueue(BatchingPolicy.from_config(config), "m"),
                          [Replica(FakeCompute())], config, "1", statistics)
    return Batcher(scheduler, statistics, config)


async def test_a_group_with_an_item_that_does_not_parse_is_refused_item_by_item():
    good = InferGroup(model_name="m", items=[GroupItem(request=request("r0", 1)),
                                             GroupItem(request=request("r1", 1))])
    # an item holding a request whose first field claims more bytes than it has
    bad_item = wire.length_delimited(InferGroup.ITEMS_FIELD_NUMBER,
                                     wire.length_delimited(1, b"\x0a\x7fshort"))
    body = good.SerializeToString() + bad_item
    answer = InferGroupResult.FromString(await batcher().handle(body, None))
    assert [r.code for r in answer.results] == [INVALID_ARGUMENT] * 3
    assert all(r.message.startswith("group is not a valid InferGroup message: ")
               for r in answer.results)


async def test_a_group_whose_head_does_not_read_ends_the_stream():
    with pytest.raises(InvalidArgument, match="group is not a valid InferGroup message"):
        await batcher().handle(b"\x0a\x05ab", None)
