"""Per model version statistics, with Triton's ModelStatistics meaning.

inference_count counts rows, execution_count counts batches; durations are summed in ns.
"""

import bisect
import time
from dataclasses import dataclass, field

from meshserve.protocol.groups_pb2 import RequestCounters
from meshserve.protocol.grpc_service_pb2 import ModelStatistics

# Latency histogram bounds (ms) for live percentiles; the last bucket is unbounded.
BUCKET_BOUNDS_MS = (0.5, 1, 1.5, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300,
                    500, 750, 1000, 2000, 5000, 10000)


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchTimes:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class Statistics:
    name: str
    version: str
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    compute: BatchTimes = field(default_factory=BatchTimes)
    batches: dict[int, BatchTimes] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKET_BOUNDS_MS) + 1))

    def record_batch(self, rows: int, requests: int, input_ns: int, infer_ns: int,
                     output_ns: int) -> None:
        """A batch of `rows` rows from `requests` requests ran; times are per batch."""
        self.inference_count += rows
        self.execution_count += 1
        self.last_inference_ms = time.time_ns() // 1_000_000
        per_size = self.batches.setdefault(rows, BatchTimes())
        for times, count in ((per_size, 1), (self.compute, requests)):
            times.compute_input.add(input_ns, count)
            times.compute_infer.add(infer_ns, count)
            times.compute_output.add(output_ns, count)

    def record_request(self, ok: bool, total_ns: int, queue_ns: int | None) -> None:
        """An answered request; `queue_ns` None when it never waited in the queue. As in
        Triton, a failure counts only in `fail`: `queue` is the successes' queuing, as
        `nv_inference_queue_duration_us` is."""
        self.buckets[bisect.bisect_left(BUCKET_BOUNDS_MS, total_ns / 1e6)] += 1
        if not ok:
            self.fail.add(total_ns)
            return
        self.success.add(total_ns)
        if queue_ns is not None:
            self.queue.add(queue_ns)

    def record_cache_hit(self, lookup_ns: int) -> None:
        """A request answered from the response cache: a success, never queued or computed
        (as in Triton, inference_count and execution_count do not count it)."""
        self.cache_hit.add(lookup_ns)
        self.record_request(True, lookup_ns, None)

    def record_cache_miss(self, lookup_and_insert_ns: int) -> None:
        self.cache_miss.add(lookup_and_insert_ns)

    def to_proto(self) -> ModelStatistics:
        stats = ModelStatistics(name=self.name, version=self.version,
                                last_inference=self.last_inference_ms,
                                inference_count=self.inference_count,
                                execution_count=self.execution_count)
        infer = stats.inference_stats
        for target, source in ((infer.success, self.success), (infer.fail, self.fail),
                               (infer.queue, self.queue),
                               (infer.cache_hit, self.cache_hit),
                               (infer.cache_miss, self.cache_miss),
                               (infer.compute_input, self.compute.compute_input),
                               (infer.compute_infer, self.compute.compute_infer),
                               (infer.compute_output, self.compute.compute_output)):
            target.count, target.ns = source.count, source.ns
        for size in sorted(self.batches):
            times = self.batches[size]
            entry = stats.batch_stats.add(batch_size=size)
            for target, source in ((entry.compute_input, times.compute_input),
                                   (entry.compute_infer, times.compute_infer),
                                   (entry.compute_output, times.compute_output)):
                target.count, target.ns = source.count, source.ns
        return stats

    def counters(self) -> RequestCounters:
        return RequestCounters(
            model_name=self.name, model_version=self.version,
            requests=self.success.count + self.fail.count, failures=self.fail.count,
            bucket_bounds_ms=BUCKET_BOUNDS_MS, bucket_counts=self.buckets)
