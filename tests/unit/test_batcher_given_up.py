"""The batcher once every request of a batch running on compute has left (each group's
handler cancelled: its client gave it up): a Python model's batch is cancelled, so that
compute tells the model (`is_cancelled()`); a TorchScript model's runs to its end."""

import asyncio

import pytest

from meshserve.batcher.policy import BatchingPolicy, BatchQueue
from meshserve.batcher.scheduler import Replica, Scheduler
from meshserve.batcher.service import Batcher
from meshserve.common.statistics import Statistics
from meshserve.protocol.groups_pb2 import GroupItem, InferGroup, InferGroupResult, ItemResult
from meshserve.protocol.grpc_service_pb2 import ModelInferResponse
from tests.polling import until
from tests.unit.test_batch import one_input_config, request


class GatedCompute:
    """Answers each batch once the test opens `gate`; records the batches cancelled."""

    def __init__(self) -> None:
        self.target = "fake:1"
        self.serving = True
        self.stream = self
        self.gate = asyncio.Event()
        self.arrived = 0
        self.given_up = 0

    async def send(self, body: list[bytes], timeout=None, resend=True, early=None) -> bytes:
        self.arrived += 1
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.given_up += 1
            raise
        return InferGroupResult(results=[ItemResult(response=ModelInferResponse())]
                                ).SerializeToString()


@pytest.mark.parametrize("backend, cancelled", [("python", True), ("", False)])
async def test_a_batch_whose_every_request_left_is_cancelled_for_a_python_model(backend,
                                                                              cancelled):
    config = one_input_config()
    config.backend = backend
    compute, statistics = GatedCompute(), Statistics(name="m", version="1")
    scheduler = Scheduler(BatchQueue(BatchingPolicy.from_config(config), "m"),
                          [Replica(compute, capacity=1)], config, "1", statistics)
    batcher = Batcher(scheduler, statistics, config)

    async def early(body: bytes) -> None:
        pass

    group = InferGroup(model_name="m", items=[GroupItem(request=request(f"r{i}", 1))
                                              for i in range(2)]).SerializeToString()
    loop = asyncio.create_task(scheduler.run())
    try:
        left = asyncio.create_task(batcher.handle(group, early))
        await until(lambda: compute.arrived, 5, "the batch on compute")
        left.cancel()
        if cancelled:
            await until(lambda: compute.given_up, 5, "the batch cancelled")
        else:
            for _ in range(20):
                await asyncio.sleep(0)
        compute.gate.set()
        await asyncio.wait_for(batcher.handle(group, early), 5)
    finally:
        loop.cancel()
        await scheduler.close()
    assert compute.arrived == 2  # the replica took the next group's batch
    assert compute.given_up == (1 if cancelled else 0)
