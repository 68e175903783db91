"""Batcher hot path: batch keys, merging requests into a batch, splitting its answer, and the
queue policy that decides when to send."""

import pytest

from benchmarks.inputs import OUTPUT, batch_response, infer_request
from meshserve.batcher.batch import batch_key, merge, split
from meshserve.batcher.policy import BatchingPolicy, BatchQueue, Pending, Send

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
    batch = benchmark(merge, requests, [1] * MLP_REQUESTS, _wanted(requests), "1")
    assert list(batch.inputs[0].shape) == [MLP_REQUESTS, 256]


@pytest.mark.benchmark(group="batcher.merge")
def test_merge_cnn_4(benchmark):
    requests = _requests("cnn", CNN_REQUESTS)
    batch = benchmark(merge, requests, [1] * CNN_REQUESTS, _wanted(requests), "1")
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
