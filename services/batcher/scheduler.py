"""The batcher's loop: acts on the policy's decisions and fans batches out to compute replicas.

The policy (`policy.BatchQueue`) decides "send n now" or "wait until t"; this loop only
carries it out: it answers expired requests, picks the replica with the least outstanding
work, and splits each batch's answer back to its requests.
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import grpc
from opentelemetry.trace import Span, StatusCode

from meshserve.batcher.batch import merge, split
from meshserve.batcher.policy import BatchQueue, Pending, Send
from meshserve.batcher.statistics import Statistics
from meshserve.common.errors import DeadlineExceeded, ServingError, Unavailable
from meshserve.common.forwarding import error_result, rpc_error_result
from meshserve.common.tracing import TRACEPARENT, Tracing, context_of, traceparent_of
from meshserve.common.upstream import Upstream
from meshserve.protocol.groups_pb2 import GroupItem, ItemResult
from meshserve.protocol.model_config_pb2 import ModelConfig

log = logging.getLogger(__name__)


@dataclass
class Replica:
    """A compute replica and the work it has outstanding."""

    upstream: Upstream
    capacity: int = 1
    batches: int = 0
    rows: int = 0

    @property
    def idle(self) -> bool:
        return self.upstream.serving and self.batches < self.capacity


@dataclass
class Job:
    """What a queued request carries through the policy."""

    item: GroupItem
    future: asyncio.Future
    # Tracing on: the request's `batcher.queue` span, ended when it leaves the queue.
    span: Span | None = None


class Scheduler:
    """`metrics`, when given, is told of each batch (`batch(rows, requests, infer_ns)`) and
    each answered request (`request(ok, total_ns, queue_ns)`), as `statistics` is.
    `tracing`, when given, traces each batch (`batcher.batch`, linked to its requests)."""

    def __init__(self, queue: BatchQueue, replicas: list[Replica], config: ModelConfig,
                 version: str, statistics: Statistics, metrics=None,
                 tracing: Tracing | None = None) -> None:
        self.queue = queue
        self._metrics = metrics
        self._tracing = tracing
        self.replicas = replicas
        self._config = config
        self._version = version
        self._statistics = statistics
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    @property
    def ready(self) -> bool:
        return any(r.upstream.serving for r in self.replicas)

    def submit(self, entry: Pending) -> None:
        """Queue a request (raises ResourceExhausted when the queue is full)."""
        self.queue.add(entry)
        self._wake.set()

    def replicas_changed(self) -> None:
        if not self.ready:
            for entry in self.queue.take(len(self.queue)):
                self._answer(entry, error_result(Unavailable(
                    f"no compute replica of model '{self._config.name}' "
                    f"version '{self._version}' is ready")))
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            for entry in self.queue.expire(now):
                self._answer(entry, error_result(DeadlineExceeded(
                    "deadline exceeded while queued for a batch (never computed)")))
            idle = [r for r in self.replicas if r.idle]
            decision = self.queue.decide(now, len(idle))
            if isinstance(decision, Send):
                self._dispatch(self.queue.take(decision.count), idle, now)
                continue
            timeout = None if decision.until is None else max(0.0, decision.until - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _dispatch(self, entries: list[Pending], idle: list[Replica], now: float) -> None:
        live = [e for e in entries if not e.payload.future.done()]  # callers that left
        if self._tracing is not None:
            for entry in entries:
                end_queue_span(entry)
        if not live:
            return
        replica = min(idle, key=lambda r: r.rows)
        rows = sum(e.rows for e in live)
        replica.batches += 1
        replica.rows += rows
        task = asyncio.get_running_loop().create_task(self._execute(replica, live, rows, now))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, replica: Replica, entries: list[Pending], rows: int,
                       dispatched: float) -> None:
        try:
            requests = [e.payload.item.request for e in entries]
            counts = [e.rows for e in entries]
            batch = merge(requests, counts, self._config, self._version)
            deadlines = [e.deadline for e in entries]
            timeout = None if None in deadlines else max(0.001, max(deadlines) - dispatched)
            if self._tracing is None:
                answer = await replica.upstream.inference.ModelInfer(batch, timeout=timeout)
            else:
                answer = await self._traced_infer(replica, batch, entries, rows, timeout)
            params = answer.parameters
            infer_ns = params["compute_infer_ns"].int64_param
            self._statistics.record_batch(
                rows, len(entries), params["compute_input_ns"].int64_param, infer_ns,
                params["compute_output_ns"].int64_param)
            if self._metrics is not None:
                self._metrics.batch(rows, len(entries), infer_ns)
            for entry, response in zip(entries, split(answer, requests, counts)):
                self._answer(entry, ItemResult(response=response), dispatched)
        except grpc.aio.AioRpcError as error:
            failed = rpc_error_result(error, f"compute replica {replica.upstream.target}")
            for entry in entries:
                self._answer(entry, failed, dispatched)
        except ServingError as error:
            for entry in entries:
                self._answer(entry, error_result(error), dispatched)
        finally:
            replica.batches -= 1
            replica.rows -= rows
            self._wake.set()

    async def _traced_infer(self, replica: Replica, batch, entries: list[Pending], rows: int,
                            timeout: float | None):
        """The compute call inside a `batcher.batch` span: a child of the oldest request's
        context, linked to every member's `batcher.queue` span; compute's span its child."""
        span = self._tracing.start(
            "batcher.batch", context_of(entries[0].payload.item.traceparent),
            {"batch.size": rows, "batch.requests": len(entries),
             "replica": replica.upstream.target},
            links=[e.payload.span.get_span_context() for e in entries if e.payload.span])
        try:
            return await replica.upstream.inference.ModelInfer(
                batch, timeout=timeout, metadata=((TRACEPARENT, traceparent_of(span)),))
        except Exception as error:
            span.set_status(StatusCode.ERROR, str(error))
            raise
        finally:
            span.end()

    def _answer(self, entry: Pending, result: ItemResult, dispatched: float | None = None) -> None:
        if self._tracing is not None:
            end_queue_span(entry)
        future = entry.payload.future
        if future.done():
            return
        future.set_result(result)
        now = time.monotonic()
        queue_ns = None if dispatched is None else int((dispatched - entry.enqueued) * 1e9)
        total_ns = int((now - entry.enqueued) * 1e9)
        self._statistics.record_request(result.code == 0, total_ns, queue_ns)
        if self._metrics is not None:
            self._metrics.request(result.code == 0, total_ns, queue_ns)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def end_queue_span(entry: Pending) -> None:
    span = entry.payload.span
    if span is not None and span.is_recording():
        span.end()
