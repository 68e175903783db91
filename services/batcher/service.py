"""The batcher: one pool per model version, dynamic batching, fan-out to compute replicas.

`meshserve batcher --model-repository R --model M --version V --compute ADDR [...]`
"""

import argparse
import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.trace import StatusCode

from meshserve.batcher.batch import batch_key, sole_key
from meshserve.batcher.caching import CachingFront, VersionIdentity
from meshserve.batcher.failover import FailoverSettings, no_replica
from meshserve.batcher.policy import BatchingPolicy, BatchQueue, Pending
from meshserve.batcher.scheduler import Answers, Job, Replica, Scheduler
from meshserve.common import runtime
from meshserve.common.batch_requests import refuse_reserved
from meshserve.common.errors import NotFound, ServingError
from meshserve.common.forwarding import (
    GroupHead,
    deadline_of,
    error_group,
    error_result,
    not_a_group,
    one_item,
    raise_for,
)
from meshserve.common.http2_client import target_argument
from meshserve.common.http2_server import server_ssl_context
from meshserve.common.identity import Callers, add_callers_flag, default_callers
from meshserve.common.metrics import BatcherMetrics, CacheMetrics, Metrics
from meshserve.common.repository import DEFAULT_MODEL_FILENAME, PYTHON, ModelRepository, kind_of
from meshserve.common.response_cache import (
    DEFAULT_BUDGET_BYTES,
    DEFAULT_TTL_SECONDS,
    LruCache,
    RedisCache,
    ResponseCache,
    artifact_digest,
)
from meshserve.common.server import HealthServicer, Service
from meshserve.common.statistics import Statistics
from meshserve.common.streams import Early, group_handler
from meshserve.common.tls import TlsFiles
from meshserve.common.tracing import Tracing, context_of
from meshserve.common.upstream import Upstream
from meshserve.common.validation import MAX_MESSAGE, Checked, Schema
from meshserve.protocol import grpc_service_pb2_grpc
from meshserve.protocol.groups_pb2 import (
    CountersRequest,
    InferGroup,
    InferGroupResult,
    ItemResult,
    RequestCounters,
)
from meshserve.protocol.grpc_service_pb2 import (
    ModelReadyResponse,
    ModelStatisticsResponse,
)
from meshserve.protocol.model_config_pb2 import ModelConfig


@dataclass(frozen=True)
class BatcherSettings:
    listen: str
    tls: TlsFiles
    repository: Path
    model: str
    version: str
    compute: tuple[str, ...]
    compute_identity: str = "compute"
    # Two: the next batch waits in the replica's stream while one runs, so compute never
    # waits for the batcher's turn-around between batches.
    batches_per_replica: int = 2
    max_queue_bytes: int = 128 << 20  # payload bytes queued + in flight
    failover: FailoverSettings = field(default_factory=FailoverSettings)
    allowed_callers: frozenset[str] = default_callers("batcher")
    # Response cache (used only by models whose config sets response_cache { enable: true }).
    cache_bytes: int = DEFAULT_BUDGET_BYTES
    cache_redis: str = ""
    cache_redis_password: str = ""
    cache_ttl_seconds: int = DEFAULT_TTL_SECONDS


class Batcher:
    """The batcher's core: takes groups, queues their requests, answers each one.

    Each request is validated against the model's configuration again (~8 µs): the router
    is trusted to be who it is, not to be right, and one malformed request must not spoil
    the batch it would join. So is the model and version it names: a batch goes to compute
    under its first request's name, so one naming another model had its whole batch refused,
    and one naming another version was answered by this one."""

    def __init__(self, scheduler: Scheduler, statistics: Statistics, config: ModelConfig,
                 tracing: Tracing | None = None, cache: CachingFront | None = None) -> None:
        self.scheduler = scheduler
        self.statistics = statistics
        self._schema = Schema(config)
        # A Python model's batches are described under a parameter its requests may not set.
        self._validate = (self._validate_unreserved if kind_of(config) is PYTHON
                          else self._schema.validate)
        self._batched = config.max_batch_size > 0
        self._key = sole_key(self._schema)  # None: each request's own
        self._tracing = tracing
        self._cache = cache

    async def infer(self, items) -> list:
        if self._cache is not None:
            return await self._cache.infer(items, self._enqueue)
        return await self._enqueue(items)

    async def _enqueue(self, items) -> list:
        return await self._submit(items).done

    def _submit(self, items) -> Answers:
        """Queue each item; a refused one is answered at once."""
        arrived = time.monotonic()
        answers = Answers(len(items))
        for index, item in enumerate(items):
            job = Job(item, answers, index)
            try:
                if not self.scheduler.ready:
                    raise self._unready()
                request = item.request
                self.check_served(request.model_name, request.model_version)
                checked = self._validate(request)
                job.outputs = checked.outputs
                if self._tracing is not None:
                    job.span = self._tracing.start(
                        "batcher.queue", context_of(item.traceparent),
                        {"request.id": item.request_id})
                self.scheduler.submit(Pending(
                    key=self._key or batch_key(request, self._batched), rows=checked.rows,
                    enqueued=arrived, deadline=deadline_of(item.timeout_us, arrived),
                    priority=item.priority, payload=job, size=checked.size))
                answers.queued += 1
            except ServingError as error:
                if job.span is not None:
                    job.span.set_status(StatusCode.ERROR, error.message)
                    job.span.end()
                answers.answer(index, error_result(error))
        return answers

    async def handle(self, body: bytes, early: Early | None = None) -> bytes:
        """A serialized InferGroup in, its serialized InferGroupResult out. With `early`, the
        items answered before the rest (refused at once, or in a batch that finished first)
        go back as they are answered, and the last answer holds the others; before any of
        them, an early answer without results says that the whole group went to a compute
        replica that has room for no more batches, or left whole in one batch of a preferred
        size. Answers that together pass the message limit between the services go back in
        as many messages as it takes."""
        try:
            group = InferGroup.FromString(body)
        except DecodeError as error:
            return refused_whole(body, error)
        if early is None or self._cache is not None:
            return InferGroupResult(results=await self.infer(group.items)).SerializeToString()
        answers = self._submit(group.items)
        told: list[int] = []
        try:
            while not answers.done.done():
                fresh = await answers.fresh()
                if partials := answers.take_partials():
                    await tell_pairs(partials, early)
                if answers.done.done():
                    break
                if not fresh and told:
                    continue
                await tell(answers.results, fresh, early)
                told += fresh
        finally:
            if not answers.done.done():  # the caller left: its queued requests are dropped
                answers.done.cancel()
        if partials := answers.take_partials():
            await tell_pairs(partials, early)
        if not told:
            whole = InferGroupResult(results=answers.results).SerializeToString()
            if len(whole) <= MAX_MESSAGE:
                return whole
        first = set(told)
        rest = [i for i in range(len(answers.results)) if i not in first]
        return await last_answer(answers.results, rest, early)

    def _validate_unreserved(self, request) -> Checked:
        refuse_reserved(request)
        return self._schema.validate(request)

    def _unready(self) -> ServingError:
        return no_replica(self.statistics.name, self.statistics.version,
                          self.scheduler.failover)

    def check_served(self, name: str, version: str) -> None:
        """NotFound unless this batcher serves model `name` version `version` ("": any)."""
        stats = self.statistics
        if name != stats.name or version not in ("", stats.version):
            raise NotFound(f"this batcher serves model '{stats.name}' version "
                           f"'{stats.version}', not '{name}' version '{version}'")


def answer_of(results: list, items: list[int]) -> bytes:
    """The answer to the items at positions `items` of a group."""
    return InferGroupResult(results=[results[i] for i in items], items=items).SerializeToString()


async def tell(results: list, items: list[int], early: Early) -> None:
    """An early answer to the items at `items`, in as many messages as the message limit
    between the services takes (answers that fit one each may not fit together)."""
    await tell_pairs([(i, results[i]) for i in items], early)


async def tell_pairs(pairs: list[tuple[int, ItemResult]], early: Early) -> None:
    """An early answer of (position, result) pairs, in their order (a decoupled model's
    answers may name a position more than once), in as many messages as it takes; none: an
    answer without results (`Answers.release`)."""
    answer = InferGroupResult(results=[r for _, r in pairs],
                              items=[i for i, _ in pairs]).SerializeToString()
    if len(pairs) > 1 and len(answer) > MAX_MESSAGE:
        half = len(pairs) // 2
        await tell_pairs(pairs[:half], early)
        await tell_pairs(pairs[half:], early)
        return
    await early(answer)


async def last_answer(results: list, items: list[int], early: Early) -> bytes:
    """A group's last answer, to the items at `items`; what would take it past the message
    limit goes first, in early answers."""
    while len(items) > 1:
        answer = answer_of(results, items)
        if len(answer) <= MAX_MESSAGE:
            return answer
        half = len(items) // 2
        await tell(results, items[:half], early)
        items = items[half:]
    return answer_of(results, items)


def refused_whole(body: bytes, error: DecodeError) -> bytes:
    """A group whose items do not parse (the router reads only a group's head): each item is
    answered INVALID_ARGUMENT, and the stream it came on goes on. Raises InvalidArgument,
    ending the stream, where not even the head reads."""
    refusal = not_a_group(error)
    try:
        items = GroupHead.read(body).items
    except ValueError:
        raise refusal from None
    return error_group(items, error_result(refusal))


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Statistics and readiness for this model version; ModelInfer for debugging."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher

    async def ModelReady(self, request, context):
        self._batcher.check_served(request.name, request.version)
        return ModelReadyResponse(ready=self._batcher.scheduler.ready)

    async def ModelStatistics(self, request, context):
        if request.name:
            self._batcher.check_served(request.name, request.version)
        return ModelStatisticsResponse(model_stats=[self._batcher.statistics.to_proto()])

    async def ModelInfer(self, request, context):
        [result] = await one_item(self._batcher.handle, request, context.time_remaining())
        raise_for(result)
        return result.response


def build_service(settings: BatcherSettings, metrics: Metrics | None = None,
                  tracing: Tracing | None = None) -> Service:
    repository = ModelRepository.load(settings.repository)
    entry = repository.get(settings.model)
    version = repository.version(settings.model, settings.version)
    config = entry.config
    policy = replace(BatchingPolicy.from_config(config),
                     max_queue_bytes=settings.max_queue_bytes)
    label = f"model '{entry.name}' version '{version}'"
    statistics = Statistics(name=entry.name, version=version)
    replicas = [Replica(Upstream(address, settings.tls, settings.compute_identity),
                        capacity=settings.batches_per_replica) for address in settings.compute]
    queue = BatchQueue(policy, label)
    recorder = None if metrics is None else BatcherMetrics(
        metrics, entry.name, version, pending=lambda: len(queue))
    scheduler = Scheduler(queue, replicas, config, version, statistics, recorder, tracing,
                          failover=settings.failover)
    cache, redis_client = build_cache(settings, config, repository, entry.name, version,
                                      statistics, metrics)
    batcher = Batcher(scheduler, statistics, config, tracing=tracing, cache=cache)
    health = HealthServicer()

    def replicas_changed() -> None:
        scheduler.replicas_changed()
        health.set(scheduler.ready, reason=refusal(replicas))

    async def counters(request, context):
        return statistics.counters()

    async def watch_counters(request, context):
        """The counters whenever they changed, looked at every interval, until draining."""
        interval = (request.interval_ms or 1000) / 1000
        last = None
        while not service.draining.is_set():
            now = statistics.counters()
            if now != last:
                last = now
                yield now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(service.draining.wait(), interval)

    def register(server) -> None:
        codec = {"request_deserializer": CountersRequest.FromString,
                 "response_serializer": RequestCounters.SerializeToString}
        server.add_generic_rpc_handlers((group_handler(batcher.handle, service.draining, {
            "Counters": grpc.unary_unary_rpc_method_handler(counters, **codec),
            "WatchCounters": grpc.unary_stream_rpc_method_handler(watch_counters, **codec)}),))
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(batcher), server)

    async def close() -> None:
        await scheduler.close()
        for replica in replicas:
            await replica.upstream.close()
        if redis_client is not None:
            await redis_client.aclose()
        if tracing is not None:
            await tracing.close()

    background = [scheduler.run] + [
        (lambda r=r: r.upstream.watch(replicas_changed)) for r in replicas]
    service = Service(settings.listen, server_ssl_context(settings.tls), register, health,
                      background=background, cleanup=[close],
                      callers=Callers("batcher", settings.allowed_callers))
    return service


def refusal(replicas: list[Replica]) -> str:
    """Why this version cannot serve, as the first compute replica that says so tells it (one
    that refused its model at load); "" when none says."""
    return next((r.upstream.reason for r in replicas if r.upstream.reason), "")


def build_cache(settings: BatcherSettings, config, repository: ModelRepository, model: str,
                version: str, statistics: Statistics, metrics: Metrics | None):
    """The response cache front when the model opts in (else None), and the Redis client
    to close."""
    if not config.response_cache.enable:
        return None, None
    filename = config.default_model_filename or DEFAULT_MODEL_FILENAME
    digest = artifact_digest(repository.get(model).path / version / filename)
    shared = client = None
    if settings.cache_redis:
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(
            settings.cache_redis, password=settings.cache_redis_password or None,
            socket_timeout=1.0, socket_connect_timeout=1.0)
        shared = RedisCache(client, settings.cache_ttl_seconds)
    recorder = None if metrics is None else CacheMetrics(metrics, model, version)
    front = CachingFront(ResponseCache(LruCache(settings.cache_bytes), shared),
                         VersionIdentity(model, version, digest), statistics, recorder)
    return front, client


redis_url = runtime.url_without_password("put it in MESHSERVE_BATCHER_REDIS_PASSWORD")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshserve batcher", description=__doc__)
    runtime.add_server_flags(parser)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", default="", help="default: the model's default version")
    parser.add_argument("--compute", action="append", required=True, metavar="HOST:PORT",
                        type=target_argument,
                        help="a compute replica of this model version (repeatable)")
    parser.add_argument("--compute-identity", default="compute",
                        help="identity the compute replicas' certificates must name")
    parser.add_argument("--batches-per-replica", type=int, default=2,
                        help="batches in flight per compute replica (2: the next batch waits "
                             "in the replica's stream while one runs)")
    parser.add_argument("--max-queue-bytes", type=int, default=128 << 20,
                        help="payload bytes queued and in flight; beyond it requests are "
                             "shed, least urgent first")
    parser.add_argument("--stall-timeout", type=float, default=0.0,
                        help="seconds a batch may take before its replica counts as stalled "
                             "(0: 20 x the observed p99 batch latency, at least 1 s)")
    parser.add_argument("--eject-after", type=int, default=2,
                        help="UNAVAILABLE answers in a row that take a replica out")
    parser.add_argument("--ejection-seconds", type=float, default=1.0,
                        help="an ejected replica stays out at least this long, then until "
                             "its health check passes")
    add_callers_flag(parser, "batcher")
    parser.add_argument("--cache-bytes", type=int, default=DEFAULT_BUDGET_BYTES,
                        help="in-process response cache budget in bytes (models that enable "
                             "response_cache in their config)")
    parser.add_argument("--cache-redis", default="", metavar="URL", type=redis_url,
                        help="also share cached responses through Redis (redis://HOST:PORT/DB "
                             "or unix:///PATH); a password comes from the environment "
                             "variable MESHSERVE_BATCHER_REDIS_PASSWORD")
    parser.add_argument("--cache-ttl", type=int, default=DEFAULT_TTL_SECONDS,
                        help="seconds a response stays in Redis")
    args = parser.parse_args(argv)
    if args.max_queue_bytes < 0 or args.stall_timeout < 0 or args.eject_after < 1 \
            or args.ejection_seconds < 0:
        parser.error("--max-queue-bytes, --stall-timeout and --ejection-seconds must be >= 0 "
                     "and --eject-after >= 1")
    if args.cache_bytes < 0 or args.cache_ttl < 1:
        parser.error("--cache-bytes must be >= 0 and --cache-ttl >= 1")
    runtime.configure_logging("batcher", args.log_level, args.log_format)
    settings = BatcherSettings(
        listen=args.listen, tls=runtime.tls_files(args), repository=args.model_repository,
        model=args.model, version=args.version, compute=tuple(args.compute),
        compute_identity=args.compute_identity, batches_per_replica=args.batches_per_replica,
        max_queue_bytes=args.max_queue_bytes,
        failover=FailoverSettings(stall_timeout=args.stall_timeout,
                                  consecutive_failures=args.eject_after,
                                  ejection_seconds=args.ejection_seconds),
        allowed_callers=args.allow_callers,
        cache_bytes=args.cache_bytes, cache_redis=args.cache_redis,
        cache_redis_password=os.environ.get("MESHSERVE_BATCHER_REDIS_PASSWORD", ""),
        cache_ttl_seconds=args.cache_ttl)

    return runtime.run_service("batcher", args, build_service, settings)
