"""What a pause alone costs the services' own Python, for `meshserve bench budget`.

At concurrency 1 every process of the mesh sleeps between its turns, and the same code then
costs more CPU, most likely because what it had in the core's caches is gone by the time it
wakes (more so in a virtual machine whose idle cores go back to the host). The model's share
of that is `budget_measure.InProcessModel`'s paused figure; this is a hop's: the batcher's
handling of a group of one mlp request, in this process, answered at once by a stand-in for
compute's stream (no sockets, no TLS, no other process), its CPU back to back and with the
process asleep for a pause before each group.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import numpy
import uvloop

from meshserve.batcher.policy import BatchingPolicy, BatchQueue
from meshserve.batcher.scheduler import Replica, Scheduler
from meshserve.batcher.service import Batcher
from meshserve.common.repository import parse_config
from meshserve.common.statistics import Statistics
from meshserve.protocol.groups_pb2 import GroupItem, InferGroup, InferGroupResult, ItemResult
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest, ModelInferResponse
from meshserve.tools.demo_models import demo_config

MODEL = "mlp"
WARMUP = 200  # groups before either measurement


class AnsweringCompute:
    """Stands in for a compute replica's stream: answers every batch of one row at once."""

    target = "in-process"
    serving = True

    def __init__(self, answer: bytes) -> None:
        self.stream = self
        self._answer = answer

    async def send(self, body: bytes, timeout: float | None = None, resend: bool = True,
                   early=None) -> bytes:
        return self._answer


def _tensor(rows: int, width: int) -> bytes:
    return numpy.random.default_rng(0).standard_normal((rows, width), numpy.float32).tobytes()


def _group_of_one() -> bytes:
    request = ModelInferRequest(model_name=MODEL, id="paused")
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, 256])
    request.raw_input_contents.append(_tensor(1, 256))
    request.outputs.add(name="OUTPUT__0")
    return InferGroup(model_name=MODEL, items=[
        GroupItem(request=request, request_id="paused", timeout_us=60_000_000)
    ]).SerializeToString()


def _answer_of_one() -> bytes:
    response = ModelInferResponse(model_name=MODEL, model_version="1")
    response.outputs.add(name="OUTPUT__0", datatype="FP32", shape=[1, 10])
    response.raw_output_contents.append(_tensor(1, 10))
    return InferGroupResult(results=[ItemResult(response=response)]).SerializeToString()


def batcher_paused_ratio(pause_s: float, seconds: float) -> float:
    """The batcher's CPU (this thread's, median per group) for a group of one, each after
    `pause_s` asleep, over the same back to back; each measured for about `seconds`."""
    return uvloop.run(_paused_ratio(pause_s, seconds))


async def _paused_ratio(pause_s: float, seconds: float) -> float:
    config = parse_config(demo_config(MODEL), f"{MODEL}/config.pbtxt", MODEL)
    stats = Statistics(name=MODEL, version="1")
    scheduler = Scheduler(BatchQueue(BatchingPolicy.from_config(config), MODEL),
                          [Replica(AnsweringCompute(_answer_of_one()), capacity=2)],
                          config, "1", stats)
    batcher = Batcher(scheduler, stats, config)
    body = _group_of_one()

    async def early(partial: bytes) -> None:
        raise RuntimeError("a group of one is answered once, whole")

    async def cpu_per_group(pause: float) -> float:
        cpu, end = [], time.monotonic() + seconds
        while time.monotonic() < end or len(cpu) < 3:
            if pause:
                time.sleep(pause)  # the whole process asleep, as between concurrency-1 turns
            start = time.thread_time_ns()
            answer = await batcher.handle(body, early)
            cpu.append(max(time.thread_time_ns() - start, 1))
            if InferGroupResult.FromString(answer).results[0].code:
                raise RuntimeError(f"the in-process batcher refused its group: {answer!r}")
        return statistics.median(cpu)

    running = asyncio.get_running_loop().create_task(scheduler.run())
    try:
        for _ in range(WARMUP):
            await batcher.handle(body, early)
        hot = await cpu_per_group(0.0)
        return await cpu_per_group(pause_s) / hot
    finally:
        running.cancel()
        await scheduler.close()
