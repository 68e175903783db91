"""The batcher with a decoupled model's compute: each answer of a request goes back as an
early answer as compute passes it on (`more` until the last), and the replica takes the next
batch once compute says `execute` has returned, while the first batch still answers."""

import asyncio

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshserve.batcher.policy import BatchingPolicy, BatchQueue
from meshserve.batcher.scheduler import Replica, Scheduler
from meshserve.batcher.service import Batcher
from meshserve.common.statistics import Statistics
from meshserve.common.tracing import Tracing, traceparent_of
from meshserve.protocol.groups_pb2 import GroupItem, InferGroup, InferGroupResult, ItemResult
from meshserve.protocol.grpc_service_pb2 import ModelInferResponse
from tests.polling import until
from tests.unit.test_batch import one_input_config, request


class StreamingCompute:
    """For each batch (of one request): an answer with more to come, then "execute
    returned", then, once the test opens the batch's gate, the request's last answer."""

    def __init__(self) -> None:
        self.target = "fake:1"
        self.serving = True
        self.stream = self
        self.arrived: asyncio.Queue[str] = asyncio.Queue()
        self.gates: dict[str, asyncio.Event] = {}
        self.traceparents: list[str] = []
        self.given_up: list[str] = []  # the requests whose batch was cancelled

    async def send(self, body: list[bytes], timeout=None, resend=True, early=None) -> bytes:
        [item] = InferGroup.FromString(b"".join(body)).items
        self.traceparents.append(item.traceparent)
        rid = item.request.id
        gate = self.gates[rid] = asyncio.Event()
        await early(answer(rid, "first", more=True))
        await early(InferGroupResult().SerializeToString())  # execute returned
        self.arrived.put_nowait(rid)
        try:
            await gate.wait()
        except asyncio.CancelledError:
            self.given_up.append(rid)
            raise
        await early(answer(rid, "last", more=False))
        timings = ModelInferResponse()
        timings.parameters["compute_infer_ns"].int64_param = 1000
        return InferGroupResult(results=[ItemResult(response=timings)]).SerializeToString()


def answer(rid: str, what: str, more: bool) -> bytes:
    return InferGroupResult(items=[0], results=[ItemResult(
        response=ModelInferResponse(id=f"{rid}:{what}"), more=more)]).SerializeToString()


def batcher_of(compute: StreamingCompute, statistics: Statistics,
               tracing: Tracing | None = None) -> tuple[Batcher, Scheduler]:
    """A decoupled model's batcher, each request a batch of its own, one replica that takes
    one batch at a time."""
    config = one_input_config()
    config.backend = "python"
    config.model_transaction_policy.decoupled = True
    config.max_batch_size = 1
    scheduler = Scheduler(BatchQueue(BatchingPolicy.from_config(config), "m"),
                          [Replica(compute, capacity=1)], config, "1", statistics,
                          tracing=tracing)
    return Batcher(scheduler, statistics, config, tracing=tracing), scheduler


async def test_answers_pass_on_and_the_replica_takes_the_next_batch_once_execute_returned():
    compute, statistics = StreamingCompute(), Statistics(name="m", version="1")
    batcher, scheduler = batcher_of(compute, statistics)
    told: list[tuple[int, str, bool]] = []

    async def early(body: bytes) -> None:
        partial = InferGroupResult.FromString(body)
        told.extend((i, r.response.id, r.more) for i, r in zip(partial.items, partial.results))

    group = InferGroup(model_name="m", items=[GroupItem(request=request(f"r{i}", 1))
                                              for i in range(2)])
    loop = asyncio.create_task(scheduler.run())
    try:
        handled = asyncio.create_task(batcher.handle(group.SerializeToString(), early))
        # one replica, one batch at a time: r1's batch runs while r0's is still open
        assert [await asyncio.wait_for(compute.arrived.get(), 5) for _ in range(2)] == [
            "r0", "r1"]
        compute.gates["r1"].set()
        compute.gates["r0"].set()
        last = InferGroupResult.FromString(await asyncio.wait_for(handled, 5))
    finally:
        loop.cancel()
        await scheduler.close()
    answered = told + [(i, r.response.id, r.more) for i, r in
                       zip(last.items or range(len(last.results)), last.results)]
    assert sorted(answered) == [(0, "r0:first", True), (0, "r0:last", False),
                                (1, "r1:first", True), (1, "r1:last", False)]
    for rid in ("r0", "r1"):  # each request's answers in the order they came
        assert [a[1] for a in answered if a[1].startswith(rid)] == [f"{rid}:first",
                                                                    f"{rid}:last"]
    assert statistics.to_proto().inference_stats.success.count == 2


async def test_each_batch_is_traced_and_compute_continues_its_span():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    compute, statistics = StreamingCompute(), Statistics(name="m", version="1")
    batcher, scheduler = batcher_of(compute, statistics, Tracing(provider))
    group = InferGroup(model_name="m", items=[GroupItem(request=request("r0", 1))])

    async def early(body: bytes) -> None:
        pass

    loop = asyncio.create_task(scheduler.run())
    try:
        handled = asyncio.create_task(batcher.handle(group.SerializeToString(), early))
        await asyncio.wait_for(compute.arrived.get(), 5)
        compute.gates["r0"].set()
        await asyncio.wait_for(handled, 5)
    finally:
        loop.cancel()
        await scheduler.close()
    [batch] = [s for s in exporter.get_finished_spans() if s.name == "batcher.batch"]
    assert compute.traceparents == [traceparent_of(batch)]


async def test_a_batch_in_flight_is_given_up_once_every_caller_left():
    """The group's handler is cancelled (the router passed on the ingress's cancel): each
    batch of it still running on compute is cancelled too, so that compute tells the model;
    the replica takes the next group's batch."""
    compute, statistics = StreamingCompute(), Statistics(name="m", version="1")
    batcher, scheduler = batcher_of(compute, statistics)

    async def early(body: bytes) -> None:
        pass

    def group(*rids: str) -> bytes:
        return InferGroup(model_name="m", items=[GroupItem(request=request(rid, 1))
                                                 for rid in rids]).SerializeToString()

    loop = asyncio.create_task(scheduler.run())
    try:
        left = asyncio.create_task(batcher.handle(group("r0", "r1", "r2"), early))
        # each batch frees the replica once execute returned: all three run at once
        assert [await asyncio.wait_for(compute.arrived.get(), 5) for _ in range(3)] == [
            "r0", "r1", "r2"]
        left.cancel()
        await until(lambda: len(compute.given_up) == 3, 5, "the batches given up")
        stays = asyncio.create_task(batcher.handle(group("r3"), early))
        assert await asyncio.wait_for(compute.arrived.get(), 5) == "r3"
        compute.gates["r3"].set()
        await asyncio.wait_for(stays, 5)
    finally:
        loop.cancel()
        await scheduler.close()
    assert sorted(compute.given_up) == ["r0", "r1", "r2"]
