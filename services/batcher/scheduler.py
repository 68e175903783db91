"""The batcher's loop: acts on the policy's decisions and fans batches out to compute replicas.

The policy (`policy.BatchQueue`) decides "send n now" or "wait until t"; this loop only
carries it out: it answers expired requests, picks the replica with the least outstanding
work, and splits each batch's answer back to its requests.

Failover (rules in `failover`): a replica that answers UNAVAILABLE (or cannot be reached)
`consecutive_failures` times in a row, or stalls past the stall timeout once, is ejected;
its failed batch is retried once on another replica when the retry budget and the
requests' deadlines allow. An ejected replica is probed and put back once it is healthy.

A batch of several requests whose answer is past the message limit between the services
(RESOURCE_EXHAUSTED without a retry hint) runs again one request at a time on the same
replica: each answer may fit alone, as Triton answers each request of a batch on its own.

One module of ~460 lines on purpose: dispatch, retry and ejection act on the same replica
table and the same in-flight batches, so the loop that owns them is kept whole; the rules it
applies are pure and live apart (`policy`, `failover`, `batch`).
"""

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

import grpc
from opentelemetry.trace import Span, StatusCode

from meshserve.batcher.batch import merge, split, split_answered
from meshserve.batcher.failover import (
    FailoverSettings,
    LatencyWindow,
    Outlier,
    RetryBudget,
    no_replica,
    retry_after,
    stall_timeout,
)
from meshserve.batcher.policy import BatchQueue, Pending, QueueFull, Send
from meshserve.common.errors import (
    DeadlineExceeded,
    Internal,
    ServingError,
    Unavailable,
    past_a_limit,
)
from meshserve.common.forwarding import (
    error_result,
    failure_result,
    serialized_group,
    status_of_result,
)
from meshserve.common.repository import PYTHON, kind_of
from meshserve.common.server import internal_error_message
from meshserve.common.statistics import Statistics
from meshserve.common.streams import Early, StreamBroken
from meshserve.common.tracing import Tracing, context_of, traceparent_of
from meshserve.common.upstream import Upstream
from meshserve.protocol.groups_pb2 import GroupItem, InferGroup, InferGroupResult, ItemResult
from meshserve.protocol.grpc_service_pb2 import ModelInferResponse
from meshserve.protocol.model_config_pb2 import ModelConfig

log = logging.getLogger(__name__)

# The compute call's time limit for a request without a deadline on a sole replica.
SOLE_REPLICA_TIMEOUT = 60.0


@dataclass
class Replica:
    """A compute replica and the work it has outstanding."""

    upstream: Upstream
    capacity: int = 1
    batches: int = 0
    rows: int = 0
    outlier: Outlier = field(default_factory=Outlier)

    @property
    def in_rotation(self) -> bool:
        return self.upstream.serving and not self.outlier.ejected

    @property
    def idle(self) -> bool:
        return self.in_rotation and self.batches < self.capacity

    def occupy(self, rows: int) -> None:
        self.batches += 1
        self.rows += rows

    def vacate(self, rows: int) -> None:
        self.batches -= 1
        self.rows -= rows


class ComputeFailed(Exception):
    """A compute call that did not answer its batch: the status `code` and `details`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


async def run_batch(replica: Replica, batch: list[bytes], model: str, version: str,
                    timeout: float | None, traceparent: str = "",
                    heard: Early | None = None) -> ModelInferResponse:
    """`batch` (a request for `model` at `version`, serialized in pieces) on `replica`'s
    stream, as a group of one; raises ComputeFailed. `heard` is told of compute's early
    answers (a decoupled model's answers, each to a request of the batch)."""
    head = InferGroup(model_name=model, version=version)
    group = serialized_group(head, [(batch, GroupItem(traceparent=traceparent))])
    try:
        # A failed batch is retried on another replica (see `_retry`), not on this one.
        reply = await replica.upstream.stream.send(group, timeout, resend=False, early=heard)
    except StreamBroken as broken:
        raise ComputeFailed(broken.code, broken.details) from None
    except TimeoutError:
        raise ComputeFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "") from None
    [result] = InferGroupResult.FromString(reply).results
    if result.code:
        raise ComputeFailed(status_of_result(result), result.message)
    return result.response


class _TooLargeTogether(Exception):
    """A batch of several requests whose answer was past the message limit."""


class _Failed(Exception):
    """A compute call failed in a way another replica might not (unreachable, UNAVAILABLE,
    stalled); `detail` says how."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Answers:
    """The results of one group's items; `done` resolves with them once every one is in, and
    `fresh()` gives the positions answered since it was last asked, as they come in (or none,
    once, when the hop before may send its next group: see `release`). `queued` counts the
    items in the queue."""

    def __init__(self, count: int) -> None:
        self.results: list[ItemResult | None] = [None] * count
        self._partials: list[tuple[int, ItemResult]] = []  # a decoupled model's, not yet told
        self.missing = count
        self.queued = 0
        self._left = False
        self._released = False
        self.done = asyncio.get_running_loop().create_future()
        self._fresh: list[int] = []
        self._news: asyncio.Future | None = None
        if not count:
            self.done.set_result(self.results)

    def answer(self, index: int, result: ItemResult) -> bool:
        """Record `result` for item `index`; False when it was answered already."""
        if self.results[index] is not None:
            return False
        self.results[index] = result
        self.missing -= 1
        self._fresh.append(index)
        self._wake()
        if not self.missing and not self.done.done():
            self.done.set_result(self.results)
        return True

    def partial(self, index: int, result: ItemResult) -> None:
        """One of a decoupled model's answers to item `index`, more to come."""
        if self.results[index] is None:
            self._partials.append((index, result))
            self._wake()

    def take_partials(self) -> list[tuple[int, ItemResult]]:
        """The answers `partial` recorded since the last call, in the order they came."""
        partials, self._partials = self._partials, []
        return partials

    def sent(self, told: bool) -> None:
        """One queued item went to compute; when it was the last and `told` (see
        `Scheduler._dispatch`), the group is released."""
        self.queued -= 1
        if not self.queued and told:
            self.release()

    def release(self) -> None:
        """The batcher wants the hop before's next group now (its requests would join a batch
        or start one at once): `fresh()` returns, with nothing new if so; once a group."""
        if not self._released:
            self._released = True
            self._left = True
            self._wake()

    def _wake(self) -> None:
        if self._news is not None and not self._news.done():
            self._news.set_result(None)

    async def fresh(self) -> list[int]:
        """The positions answered since the last call, waiting for one when there are none
        (and the group has not just left the queue, and no partial answer waits)."""
        if not self._fresh and not self._left and not self._partials:
            self._news = asyncio.get_running_loop().create_future()
            await self._news
        self._left = False
        fresh, self._fresh = self._fresh, []
        return fresh

    @property
    def abandoned(self) -> bool:
        """The caller left (its group's handler was cancelled) or everything is answered."""
        return self.done.done()


@dataclass
class Job:
    """What a queued request carries through the policy: where its answer goes."""

    item: GroupItem
    answers: Answers
    index: int
    outputs: list[str] | None = None  # the outputs the request names (None: all)
    # Tracing on: the request's `batcher.queue` span, ended when it leaves the queue.
    span: Span | None = None

    @property
    def answered(self) -> bool:
        return self.answers.abandoned or self.answers.results[self.index] is not None


class Scheduler:
    """`metrics`, when given, is told of each batch (`batch(rows, requests, infer_ns)`) and
    each answered request (`request(ok, total_ns, queue_ns)`), as `statistics` is.
    `tracing`, when given, traces each batch (`batcher.batch`, linked to its requests)."""

    def __init__(self, queue: BatchQueue, replicas: list[Replica], config: ModelConfig,
                 version: str, statistics: Statistics, metrics=None,
                 tracing: Tracing | None = None, *,
                 failover: FailoverSettings | None = None) -> None:
        self.queue = queue
        self._metrics = metrics
        self._failover_metrics = None if metrics is None else metrics.failover
        self._tracing = tracing
        self.replicas = replicas
        self._config = config
        self._version = version
        # A Python model answers each request of a batch on its own, as in Triton: its
        # batches say whose rows they hold, and a request may fail alone.
        self._per_request = kind_of(config) is PYTHON
        # A decoupled model answers each request of a batch any number of times, as compute
        # passes its answers on (`_attempt_decoupled`).
        self._decoupled = config.model_transaction_policy.decoupled
        self._statistics = statistics
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self.failover = failover or FailoverSettings()
        self._budget = RetryBudget(self.failover.retry_ratio, self.failover.retry_floor,
                                   self.failover.retry_window)
        self._latency = LatencyWindow()
        self._ready = False
        for replica in replicas:
            replica.outlier = Outlier(self.failover.consecutive_failures,
                                      self.failover.ejection_seconds)
            self._replica_up(replica)

    @property
    def ready(self) -> bool:
        """A replica is in rotation (kept current by `_replica_up`, which every change of a
        replica's standing goes through)."""
        return self._ready

    def retry_after(self) -> float:
        """The hint for a refusal now: about the time to drain the queue."""
        return retry_after(self.queue.rows, self._config.max_batch_size,
                           self._latency.quantile(0.5),
                           sum(r.in_rotation for r in self.replicas))

    def stall_timeout(self) -> float:
        return stall_timeout(self.failover.stall_timeout, self._latency.quantile(0.99))

    def submit(self, entry: Pending) -> None:
        """Queue a request, answering any it sheds (raises QueueFull when it is refused)."""
        try:
            shed = self.queue.add(entry, self.retry_after)
        except QueueFull as refused:
            self._count_shed(refused.reason)
            raise
        for victim in shed:
            self._count_shed(victim.error.reason)
            self._answer(victim.entry, error_result(victim.error))
        self._wake.set()

    def replicas_changed(self) -> None:
        for replica in self.replicas:
            self._replica_up(replica)
        if not self.ready:
            self._answer_all(no_replica(self._config.name, self._version, self.failover))
        self._wake.set()

    def _answer_all(self, error: ServingError) -> None:
        entries = self.queue.take(len(self.queue))
        self.queue.release(entries)
        for entry in entries:
            self._answer(entry, error_result(error))

    async def run(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            for entry in self.queue.expire(now):
                self._count_shed("deadline")
                self._answer(entry, error_result(self.queue.expiry(entry, now)))
            idle = [r for r in self.replicas if r.idle]
            decision = self.queue.decide(now, len(idle))
            if isinstance(decision, Send):
                self._dispatch(self.queue.take(decision.count), idle, now)
                continue
            if idle and len(self.queue):
                # A batch waits for more requests (the queue delay) while compute has room:
                # the hops before must send theirs now, or none could join it.
                for entry in self.queue:
                    entry.payload.answers.release()
            timeout = None if decision.until is None else max(0.0, decision.until - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _dispatch(self, entries: list[Pending], idle: list[Replica], now: float) -> None:
        live = [e for e in entries if not e.payload.answered]  # callers that left
        self.queue.release([e for e in entries if e.payload.answered])
        if self._tracing is not None:
            for entry in entries:
                end_queue_span(entry)
        if not live:
            return
        replica = min(idle, key=lambda r: r.rows)
        rows = sum(e.rows for e in live)
        replica.occupy(rows)
        # A group whose last request leaves for a compute that has room for no more batches,
        # or that leaves whole in one batch of a preferred size, says so (an early answer
        # without results): the hop before sends its next group now, so that it is queued
        # here before compute runs out of work. So does one that leaves a replica with
        # nothing to do (several instances): the next requests start there at once, as
        # Triton runs a batch on each free instance.
        told = not any(r.idle for r in self.replicas) or any(
            r.batches == 0 and r.in_rotation for r in self.replicas)
        whole = () if told else self._whole_groups(live, rows)
        for entry in live:
            answers = entry.payload.answers
            answers.sent(told or answers in whole)
        self._budget.sent(now)
        task = asyncio.get_running_loop().create_task(self._execute(replica, live, now))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _whole_groups(self, batch: list[Pending], rows: int) -> list[Answers]:
        """The groups that `batch` (of `rows` rows) holds whole, when its rows make a
        preferred batch size: the hop before gathers no better batch for a model that says
        what it prefers."""
        if rows not in self.queue.policy.preferred_batch_sizes:
            return []
        groups: dict[Answers, int] = {}
        for entry in batch:
            groups[entry.payload.answers] = groups.get(entry.payload.answers, 0) + 1
        return [answers for answers, count in groups.items() if count == len(answers.results)]

    async def _execute(self, replica: Replica, entries: list[Pending], dispatched: float) -> None:
        """Run the batch on `replica`; on a replica failure, once more on another one."""
        try:
            try:
                if self._decoupled:
                    await self._attempt_decoupled(replica, entries, dispatched)
                else:
                    await self._attempt(replica, entries, dispatched)
            except _TooLargeTogether:
                await self._one_at_a_time(replica, entries, dispatched)
            except _Failed as failed:
                await self._retry(replica, entries, failed, dispatched)
        except ServingError as error:
            for entry in entries:
                self._answer(entry, error_result(error), dispatched)
        except Exception as error:  # noqa: BLE001 — every request must hear of it
            failed = error_result(Internal(internal_error_message(error)))
            for entry in entries:
                self._answer(entry, failed, dispatched)
        finally:
            self.queue.release(entries)
            self._wake.set()

    async def _one_at_a_time(self, replica: Replica, entries: list[Pending],
                             dispatched: float) -> None:
        """Each request of a batch whose answer was past the message limit, in a batch of its
        own on the same replica, in turn."""
        for entry in entries:
            if entry.payload.answered:
                continue
            replica.occupy(entry.rows)
            try:
                await self._attempt(replica, [entry], dispatched)
            except _Failed as failed:
                await self._retry(replica, [entry], failed, dispatched)

    async def _retry(self, failed_on: Replica, entries: list[Pending], failed: _Failed,
                     dispatched: float) -> None:
        """Retry a failed batch once on another replica in rotation, when the budget and the
        deadlines allow; otherwise answer UNAVAILABLE with a retry hint."""
        now = time.monotonic()
        for entry in entries:
            if entry.deadline is not None and entry.deadline <= now:
                self._answer(entry, error_result(DeadlineExceeded(
                    f"deadline exceeded after {failed.detail}")), dispatched)
        live = [e for e in entries if not e.payload.answered]
        if not live:
            return
        others = [r for r in self.replicas if r is not failed_on and r.in_rotation]
        if not others:
            outcome, why = "no_replica", "no other compute replica is in rotation"
        elif not self._budget.try_retry(now):
            outcome, why = "budget_exhausted", "the retry budget is spent"
        else:
            target = min(others, key=lambda r: r.rows)
            target.occupy(sum(e.rows for e in live))
            try:
                await self._attempt(target, live, dispatched)
            except _Failed as again:
                self._count_retry("failed")
                self._answer_failed(live, f"{again.detail} (on retry; first attempt: "
                                    f"{failed.detail})", dispatched)
            else:
                self._count_retry("ok")
            return
        self._count_retry(outcome)
        self._answer_failed(live, f"{failed.detail}; not retried: {why}", dispatched)

    def _answer_failed(self, entries: list[Pending], detail: str, dispatched: float) -> None:
        error = Unavailable(detail, self.retry_after())
        for entry in entries:
            self._answer(entry, error_result(error), dispatched)

    async def _attempt(self, replica: Replica, entries: list[Pending], dispatched: float) -> None:
        """One compute call for `entries` on `replica` (already occupied for them): answers
        them, or raises _Failed for a failure another replica might not have."""
        rows = sum(e.rows for e in entries)
        started = time.monotonic()
        # A stall is worth detecting only when another replica could take the batch; a sole
        # replica gets the requests' time (bounded, so nothing waits forever).
        alone = not self._others_in_rotation(replica)
        stall = SOLE_REPLICA_TIMEOUT if alone else self.stall_timeout()
        try:
            requests = [e.payload.item.request for e in entries]
            counts = [e.rows for e in entries]
            wanted = [e.payload.outputs for e in entries]
            batch = merge(requests, counts, wanted, self._version, self._per_request)
            deadlines = [e.deadline for e in entries]
            left = None if None in deadlines else max(0.001, max(deadlines) - started)
            timeout = stall if left is None else min(left, stall)
            try:
                call = (run_batch(replica, batch, requests[0].model_name, self._version, timeout)
                        if self._tracing is None else
                        self._traced_infer(replica, batch, requests[0].model_name, entries,
                                           rows, timeout))
                if not self._per_request:  # TorchScript and ONNX run to the end regardless
                    answer = await call
                elif (answer := await unless_all_left(call, entries)) is None:
                    return
            except ComputeFailed as error:
                if len(entries) > 1 and past_a_limit(error.code.name, error.details):
                    raise _TooLargeTogether from None
                self._replica_failed(replica, error,
                                     stalled=not alone and (left is None or stall < left),
                                     started=started, stall=stall)
                for entry in entries:
                    self._answer(entry, failure_result(
                        error.code, error.details, f"compute replica {replica.upstream.target}"),
                        dispatched)
                return
            replica.outlier.success()
            self._latency.add(time.monotonic() - started)
            self._record_batch(answer, rows, len(entries))
            results = (split_answered if self._per_request else split)(
                answer, requests, counts, wanted)
            for entry, result in zip(entries, results):
                self._answer(entry, result, dispatched)
        finally:
            replica.vacate(rows)

    def _record_batch(self, answer: ModelInferResponse, rows: int, requests: int) -> None:
        params = answer.parameters
        infer_ns = params["compute_infer_ns"].int64_param
        self._statistics.record_batch(
            rows, requests, params["compute_input_ns"].int64_param, infer_ns,
            params["compute_output_ns"].int64_param)
        if self._metrics is not None:
            self._metrics.batch(rows, requests, infer_ns)

    async def _attempt_decoupled(self, replica: Replica, entries: list[Pending],
                                 dispatched: float) -> None:
        """A decoupled model's batch on `replica`: compute passes on each answer as the model
        sends it, in early answers to its request's position in the batch (`more` until the
        request's last), frees the replica for the next batch once `execute` has returned (an
        early answer without results), and answers last with the batch's timings. No stall
        timeout and no retry: a request's answers may come for as long as its deadline
        allows, and once one has gone out the batch cannot run again."""
        rows = sum(e.rows for e in entries)
        occupied = True

        def free() -> None:
            nonlocal occupied
            if occupied:
                occupied = False
                replica.vacate(rows)
                self._wake.set()

        async def heard(body: bytes | memoryview) -> None:
            partial = InferGroupResult.FromString(body)
            if not partial.results:
                free()
            for position, result in zip(partial.items, partial.results, strict=True):
                entry = entries[position]
                if not result.more:
                    self._answer(entry, result, dispatched)
                elif not entry.payload.answered:
                    entry.payload.answers.partial(entry.payload.index, result)

        batch = merge([e.payload.item.request for e in entries], [e.rows for e in entries],
                      [e.payload.outputs for e in entries], self._version, self._per_request)
        deadlines = [e.deadline for e in entries]
        left = None if None in deadlines else max(0.001, max(deadlines) - time.monotonic())
        try:
            answer = await unless_all_left(
                run_batch(replica, batch, self._config.name, self._version, left, heard=heard)
                if self._tracing is None else
                self._traced_infer(replica, batch, self._config.name, entries, rows, left,
                                   heard), entries)
            if answer is None:
                return
        except ComputeFailed as error:
            failed = failure_result(error.code, error.details,
                                    f"compute replica {replica.upstream.target}")
            for entry in entries:
                self._answer(entry, failed, dispatched)
            return
        finally:
            free()
        replica.outlier.success()
        self._record_batch(answer, rows, len(entries))
        ended = error_result(Internal(
            f"model '{self._config.name}' version {self._version} ended a batch without the "
            "final flag of each of its requests"))
        for entry in entries:
            self._answer(entry, ended, dispatched)  # none that had its last answer already

    def _replica_failed(self, replica: Replica, error: ComputeFailed, *, stalled: bool,
                        started: float, stall: float) -> None:
        """Raise _Failed when the failure is the replica's (unreachable, UNAVAILABLE, or
        stalled past `stall`), after counting it against the replica; return otherwise."""
        code = error.code
        target = replica.upstream.target
        now = time.monotonic()
        last = not self._others_in_rotation(replica)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and stalled:
            ejected = replica.outlier.stall(now, last)
            detail = (f"compute replica {target} stalled (no answer in {now - started:.2f} s, "
                      f"stall timeout {stall:.2f} s)")
        elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            ejected = replica.outlier.failure(now, last)
            detail = f"compute replica {target} unavailable: {error.details}"
        else:
            return
        if ejected:
            self._ejected(replica)
        raise _Failed(detail)

    def _others_in_rotation(self, replica: Replica) -> bool:
        return any(r is not replica and r.in_rotation for r in self.replicas)

    def _ejected(self, replica: Replica) -> None:
        log.warning("compute replica %s ejected (%s)", replica.upstream.target,
                    replica.outlier.reason)
        if self._failover_metrics is not None:
            self._failover_metrics.ejection(replica.upstream.target)
        self._replica_up(replica)
        probe = asyncio.get_running_loop().create_task(self._probe(replica))
        self._tasks.add(probe)
        probe.add_done_callback(self._tasks.discard)
        if not self.ready:
            self._answer_all(no_replica(self._config.name, self._version, self.failover,
                                        "in rotation"))

    async def _probe(self, replica: Replica) -> None:
        """Health-probe an ejected replica until it may be put back, then put it back."""
        interval = self.failover.probe_interval
        while True:
            await asyncio.sleep(interval)
            healthy = await replica.upstream.check(timeout=max(interval * 4, 1.0))
            if replica.outlier.may_readmit(time.monotonic(), healthy):
                replica.outlier.readmit()
                log.info("compute replica %s is back in rotation", replica.upstream.target)
                self._replica_up(replica)
                self._wake.set()
                return

    def _replica_up(self, replica: Replica) -> None:
        self._ready = any(r.in_rotation for r in self.replicas)
        if self._failover_metrics is not None:
            self._failover_metrics.replica_up(replica.upstream.target, replica.in_rotation)

    def _count_shed(self, reason: str) -> None:
        if self._failover_metrics is not None:
            self._failover_metrics.shed(reason)

    def _count_retry(self, outcome: str) -> None:
        if self._failover_metrics is not None:
            self._failover_metrics.retry(outcome)

    async def _traced_infer(self, replica: Replica, batch: list[bytes], model: str,
                            entries: list[Pending], rows: int, timeout: float | None,
                            heard: Early | None = None):
        """The compute call inside a `batcher.batch` span: a child of the oldest request's
        context, linked to every member's `batcher.queue` span; compute's span its child
        (`heard`: as `run_batch`'s)."""
        span = self._tracing.start(
            "batcher.batch", context_of(entries[0].payload.item.traceparent),
            {"batch.size": rows, "batch.requests": len(entries),
             "replica": replica.upstream.target},
            links=[e.payload.span.get_span_context() for e in entries if e.payload.span])
        try:
            return await run_batch(replica, batch, model, self._version, timeout,
                                   traceparent_of(span), heard)
        except Exception as error:
            span.set_status(StatusCode.ERROR, str(error))
            raise
        finally:
            span.end()

    def _answer(self, entry: Pending, result: ItemResult, dispatched: float | None = None) -> None:
        if self._tracing is not None:
            end_queue_span(entry)
        job = entry.payload
        if job.answers.abandoned or not job.answers.answer(job.index, result):
            return
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


async def unless_all_left(call: Awaitable[ModelInferResponse],
                          entries: list[Pending]) -> ModelInferResponse | None:
    """A Python model's batch on compute (`call`): its answer; None when every request of the
    batch left first (each group's handler was cancelled: its client gave it up), in which
    case the call is cancelled, so that compute tells the model (`is_cancelled()`)."""
    run = asyncio.ensure_future(call)
    left = functools.partial(_cancel_if_all_left, run, entries)
    for answers in {entry.payload.answers for entry in entries}:
        answers.done.add_done_callback(left)
    try:
        return await run
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():
            raise
        return None


def _cancel_if_all_left(run: asyncio.Future, entries: list[Pending], _=None) -> None:
    if all(entry.payload.answers.done.cancelled() for entry in entries):
        run.cancel()


def end_queue_span(entry: Pending) -> None:
    span = entry.payload.span
    if span is not None and span.is_recording():
        span.end()
