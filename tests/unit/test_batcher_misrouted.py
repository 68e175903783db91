"""A request that names another model or version than its batcher's is refused alone,
NOT_FOUND naming both, and the requests it would have been batched with are answered: a batch
goes to compute under its first request's name, which compute checks, so such a request once
had its whole batch refused (or, naming another version, was answered by this one)."""

import asyncio

import pytest

from meshserve.batcher.policy import BatchingPolicy, BatchQueue
from meshserve.batcher.scheduler import Replica, Scheduler
from meshserve.batcher.service import Batcher
from meshserve.common.errors import NotFound
from meshserve.common.forwarding import error_result
from meshserve.common.statistics import Statistics
from meshserve.protocol.groups_pb2 import GroupItem, InferGroup, InferGroupResult, ItemResult
from meshserve.protocol.grpc_service_pb2 import ModelInferResponse
from tests.unit.test_batch import floats, one_input_config, request

OK, NOT_FOUND = 0, 5


class CheckingCompute:
    """A compute replica of model "m" version "1" that refuses a batch naming another model
    or version, as compute does, and answers the others with two columns per row."""

    def __init__(self) -> None:
        self.target = "fake:1"
        self.serving = True
        self.stream = self

    async def send(self, body: list[bytes], timeout=None, resend=True, early=None) -> bytes:
        results = []
        for item in InferGroup.FromString(b"".join(body)).items:
            batch = item.request
            if batch.model_name != "m" or batch.model_version not in ("", "1"):
                results.append(error_result(NotFound(
                    f"this compute replica serves model 'm' version '1', not "
                    f"'{batch.model_name}' version '{batch.model_version}'")))
                continue
            rows = batch.inputs[0].shape[0]
            response = ModelInferResponse(model_name="m", model_version="1")
            response.outputs.add(name="OUT", datatype="FP32", shape=[rows, 2])
            response.raw_output_contents.append(floats(0, rows * 2))
            results.append(ItemResult(response=response))
        return InferGroupResult(results=results).SerializeToString()


async def answered(items: list[GroupItem]) -> list[ItemResult]:
    config = one_input_config()
    statistics = Statistics(name="m", version="1")
    scheduler = Scheduler(BatchQueue(BatchingPolicy.from_config(config), "m"),
                          [Replica(CheckingCompute())], config, "1", statistics)
    batcher = Batcher(scheduler, statistics, config)
    loop = asyncio.create_task(scheduler.run())
    try:
        body = InferGroup(model_name="m", version="1", items=items).SerializeToString()
        return list(InferGroupResult.FromString(await batcher.handle(body, None)).results)
    finally:
        loop.cancel()
        await scheduler.close()


def named(rid: str, model: str = "m", version: str = "") -> GroupItem:
    built = request(rid, 1)
    built.model_name, built.model_version = model, version
    return GroupItem(request=built, request_id=rid)


@pytest.mark.parametrize(("model", "version"), [("other", ""), ("other", "1"), ("m", "2"),
                                                ("", "")])
@pytest.mark.parametrize("first", [True, False])
async def test_a_request_for_another_model_or_version_is_refused_alone(model, version, first):
    stray = named("stray", model, version)
    good = [named("a"), named("b", version="1")]
    results = await answered([stray, *good] if first else [*good, stray])
    refused = results[0] if first else results[-1]
    assert (refused.code, refused.message) == (
        NOT_FOUND, f"this batcher serves model 'm' version '1', not '{model}' version "
                   f"'{version}'")
    served = results[1:] if first else results[:-1]
    assert [(r.code, r.response.model_name, r.response.id) for r in served] == [
        (OK, "m", "a"), (OK, "m", "b")]
