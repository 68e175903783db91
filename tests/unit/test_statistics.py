"""Batcher statistics: Triton's ModelStatistics meaning, and the live counters."""

from meshserve.common.statistics import BUCKET_BOUNDS_MS, Statistics


def test_rows_and_batches_are_counted_like_triton():
    stats = Statistics("mlp", "2")
    stats.record_batch(rows=5, requests=2, input_ns=10, infer_ns=100, output_ns=20)
    stats.record_batch(rows=1, requests=1, input_ns=1, infer_ns=50, output_ns=2)
    for total_ns, queue_ns in ((1_000_000, 10), (2_000_000, 20), (3_000_000, 30)):
        stats.record_request(True, total_ns, queue_ns)
    stats.record_request(False, 4_000_000, None)
    proto = stats.to_proto()
    assert (proto.inference_count, proto.execution_count) == (6, 2)
    infer = proto.inference_stats
    assert (infer.success.count, infer.success.ns) == (3, 6_000_000)
    assert (infer.fail.count, infer.fail.ns) == (1, 4_000_000)
    assert (infer.queue.count, infer.queue.ns) == (3, 60)
    assert (infer.compute_infer.count, infer.compute_infer.ns) == (3, 150)
    assert [(b.batch_size, b.compute_infer.count, b.compute_infer.ns)
            for b in proto.batch_stats] == [(1, 1, 50), (5, 1, 100)]


def test_a_failed_request_counts_in_fail_only_as_in_triton():
    """A request that failed after its batch left the queue (its replica failed, its
    deadline passed) is no success's queuing: `queue` stays the successes', so that its count
    is success's and its time is what `nv_inference_queue_duration_us` counts."""
    stats = Statistics("mlp", "1")
    stats.record_request(True, 2_000_000, 300)
    stats.record_request(False, 9_000_000, 5_000)
    infer = stats.to_proto().inference_stats
    assert (infer.success.count, infer.success.ns) == (1, 2_000_000)
    assert (infer.fail.count, infer.fail.ns) == (1, 9_000_000)
    assert (infer.queue.count, infer.queue.ns) == (1, 300)


def test_counters_histogram_places_each_latency_in_its_bucket():
    stats = Statistics("mlp", "2")
    for ms in (0.2, 0.5, 0.6, 4.0, 20_000.0):
        stats.record_request(True, int(ms * 1e6), 0)
    stats.record_request(False, 1_000_000, 0)
    counters = stats.counters()
    assert (counters.requests, counters.failures) == (6, 1)
    assert list(counters.bucket_bounds_ms) == list(BUCKET_BOUNDS_MS)
    counts = dict(zip([*BUCKET_BOUNDS_MS, "over"], counters.bucket_counts))
    assert counts[0.5] == 2 and counts[1] == 2 and counts[4] == 1 and counts["over"] == 1
    assert sum(counters.bucket_counts) == 6
