"""The response cache at the batcher's entry, before anything is queued.

The batcher serves exactly one model version with one artifact, so it can key responses by
them (the router cannot: which version serves an unpinned request is picked by the xDS
client). A hit is answered at once and never queued or computed; misses go on to the queue
and their successful responses are inserted.
"""

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from meshserve.common.response_cache import ResponseCache, cache_key
from meshserve.common.statistics import Statistics
from meshserve.protocol.groups_pb2 import GroupItem, ItemResult
from meshserve.protocol.grpc_service_pb2 import ModelInferResponse

Forward = Callable[[Sequence[GroupItem]], Awaitable[list[ItemResult]]]


@dataclass(frozen=True)
class VersionIdentity:
    """What a cached response depends on besides the request."""

    model: str
    version: str
    digest: str


class CachingFront:
    """`metrics`, when given, is told `hit(lookup_ns)` and `miss(lookup_and_insert_ns)`."""

    def __init__(self, cache: ResponseCache, identity: VersionIdentity, statistics: Statistics,
                 metrics=None, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._cache = cache
        self._identity = identity
        self._statistics = statistics
        self._metrics = metrics
        self._clock = clock

    def key(self, item: GroupItem) -> bytes:
        identity = self._identity
        return cache_key(identity.model, identity.version, identity.digest, item.request)

    async def infer(self, items: Sequence[GroupItem], forward: Forward) -> list[ItemResult]:
        results: list[ItemResult | None] = [None] * len(items)
        misses: list[tuple[int, bytes, int]] = []  # (index, key, lookup ns)
        for index, item in enumerate(items):
            started = self._clock()
            key = self.key(item)
            cached = await self._cache.get(key)
            lookup_ns = self._clock() - started
            if cached is None:
                misses.append((index, key, lookup_ns))
                continue
            response = ModelInferResponse.FromString(cached)
            response.id = item.request.id
            results[index] = ItemResult(response=response)
            self._statistics.record_cache_hit(lookup_ns)
            if self._metrics is not None:
                self._metrics.hit(lookup_ns)
        if misses:
            answered = await forward([items[index] for index, _, _ in misses])
            for (index, key, lookup_ns), result in zip(misses, answered, strict=True):
                results[index] = result
                started = self._clock()
                if result.code == 0:
                    await self._cache.put(key, result.response.SerializeToString())
                miss_ns = lookup_ns + self._clock() - started
                self._statistics.record_cache_miss(miss_ns)
                if self._metrics is not None:
                    self._metrics.miss(miss_ns)
        return results  # type: ignore[return-value]
