"""Batcher hot path: batch keys, merging requests into a batch, splitting its answer, the
queue policy that decides when to send, and a whole group through `Batcher.handle`."""

import asyncio

import pytest

from benchmarks.inputs import OUTPUT, batch_response, infer_request
from meshserve.batcher.batch import batch_key, merge, split
from meshserve.batcher.policy import BatchingPolicy, BatchQueue, Pending, Send
from meshserve.batcher.scheduler import Replica, Scheduler
from meshserve.batcher.service import Batcher
from meshserve.common.statistics import Statistics
from meshserve.protocol.groups_pb2 import GroupItem, InferGroup, InferGroupResult, ItemResult
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest

MLP_REQUESTS = 32  # single-row mlp requests: one full batch (max_batch_size 32)
CNN_REQUESTS = 4  # single-row cnn requests: one preferred batch (preferred_batch_size 4)


def _requests(name, count):
    return [infer_request(name, seed=n) for n in range(count)]


def _wanted(requests):
    """The outputs each request names, as validation reads them: OUTPUT__0."""
    return [[OUTPUT]] * len(requests)


@pytest.mark.benchmark(group="batcher.merge")
def test_merge_mlp_32(benchmark):
    requests = _requests("mlp", MLP_REQUESTS)
    pieces = benchmark(merge, requests, [1] * MLP_REQUESTS, _wanted(requests), "1")
    batch = ModelInferRequest.FromString(b"".join(pieces))
    assert list(batch.inputs[0].shape) == [MLP_REQUESTS, 256]


@pytest.mark.benchmark(group="batcher.merge")
def test_merge_cnn_4(benchmark):
    requests = _requests("cnn", CNN_REQUESTS)
    pieces = benchmark(merge, requests, [1] * CNN_REQUESTS, _wanted(requests), "1")
    batch = ModelInferRequest.FromString(b"".join(pieces))
    assert list(batch.inputs[0].shape) == [CNN_REQUESTS, 3, 64, 64]


@pytest.mark.benchmark(group="batcher.split")
def test_split_mlp_32(benchmark):
    requests = _requests("mlp", MLP_REQUESTS)
    answers = benchmark(split, batch_response("mlp", MLP_REQUESTS), requests,
                        [1] * MLP_REQUESTS, _wanted(requests))
    assert len(answers) == MLP_REQUESTS


@pytest.mark.benchmark(group="batcher.split")
def test_split_cnn_4(benchmark):
    requests = _requests("cnn", CNN_REQUESTS)
    answers = benchmark(split, batch_response("cnn", CNN_REQUESTS), requests,
                        [1] * CNN_REQUESTS, _wanted(requests))
    assert len(answers) == CNN_REQUESTS


@pytest.mark.benchmark(group="batcher.key")
def test_batch_key_mlp(benchmark):
    key = benchmark(batch_key, infer_request("mlp"), True)
    assert key == (("INPUT__0", "FP32", (256,)),)


@pytest.mark.benchmark(group="batcher.key")
def test_batch_key_cnn(benchmark):
    key = benchmark(batch_key, infer_request("cnn"), True)
    assert key == (("INPUT__0", "FP32", (3, 64, 64)),)


def _entries(request, count):
    key = batch_key(request, True)
    return [Pending(key=key, rows=1, enqueued=0.0, deadline=None) for _ in range(count)]


def _cycle(policy, entries, now=0.0):
    """As the scheduler does: queue every entry, then expire / decide / take until empty.

    Reusing the entries across rounds is safe: `add` only clamps their priority (idempotent
    here) and, with no queue timeout, leaves their deadline alone.
    """
    queue = BatchQueue(policy, "bench")
    for entry in entries:
        queue.add(entry)
    batches = []
    while len(queue):
        queue.expire(now)
        decision = queue.decide(now, 1)
        assert isinstance(decision, Send)
        batches.append(len(queue.take(decision.count)))
    return batches


@pytest.mark.benchmark(group="batcher.policy")
def test_queue_mlp_32_one_full_batch(benchmark, mlp_config):
    policy = BatchingPolicy.from_config(mlp_config)
    entries = _entries(infer_request("mlp"), MLP_REQUESTS)
    assert benchmark(_cycle, policy, entries) == [MLP_REQUESTS]


@pytest.mark.benchmark(group="batcher.policy")
def test_queue_cnn_32_preferred_batches_of_4(benchmark, cnn_config):
    policy = BatchingPolicy.from_config(cnn_config)
    entries = _entries(infer_request("cnn"), 32)
    assert benchmark(_cycle, policy, entries) == [CNN_REQUESTS] * 8


# Single-row mlp requests per group: as the router sends them at concurrency 1 and 32.
GROUPS = (1, 32)


class ImmediateCompute:
    """A compute replica's stream that answers each batch at once with a prebuilt answer of
    its rows."""

    target = "bench:1"
    serving = True

    def __init__(self):
        self.stream = self
        self.rows = []
        self._replies = {}

    async def send(self, body, timeout=None, resend=True, early=None):
        rows = InferGroup.FromString(b"".join(body)).items[0].request.inputs[0].shape[0]
        self.rows.append(rows)
        reply = self._replies.get(rows)
        if reply is None:
            reply = self._replies[rows] = InferGroupResult(
                results=[ItemResult(response=batch_response("mlp", rows))]).SerializeToString()
        return reply


@pytest.mark.benchmark(group="batcher.handle")
@pytest.mark.parametrize("size", GROUPS)
def test_handle_group_mlp(benchmark, mlp_config, size):
    """A serialized group of `size` in, its answer out: validation, the queue, the batch's
    merge, the compute call and the split, as on the batcher's stream (divide by `size` for a
    request; a group of one is each request at concurrency 1)."""
    loop = asyncio.new_event_loop()
    compute, statistics = ImmediateCompute(), Statistics(name="mlp", version="1")
    scheduler = Scheduler(BatchQueue(BatchingPolicy.from_config(mlp_config), "mlp"),
                          [Replica(compute, capacity=2)], mlp_config, "1", statistics)
    batcher = Batcher(scheduler, statistics, mlp_config)
    body = InferGroup(model_name="mlp", items=[
        GroupItem(request=infer_request("mlp", seed=n), request_id=f"ab12cd34-{n}",
                  timeout_us=60_000_000) for n in range(size)]).SerializeToString()

    async def early(partial):
        raise AssertionError("a group of one batch is answered once")

    running = loop.create_task(scheduler.run())
    try:
        answer = benchmark(lambda: loop.run_until_complete(batcher.handle(body, early)))
    finally:
        running.cancel()
        loop.run_until_complete(scheduler.close())
        loop.close()
    results = InferGroupResult.FromString(answer).results
    assert [r.code for r in results] == [0] * size
    assert set(compute.rows) == {size}
