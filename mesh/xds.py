"""The Aggregated Discovery Service (state of the world) over one current snapshot.

Each stream remembers, per resource type, the names the client subscribed to and the
version it last acknowledged. A new snapshot, or a new subscription, sends that type again.
ACK: the client echoes our version and nonce. NACK: `error_detail` is set; we log the reason
(its first KiB) and the client keeps its last good configuration. What a client sends is
bounded in what it makes the server hold: the last KEEP_NACKS reasons are kept, and requests
for types the control plane does not serve are let go (2,000 NACKs of 100 KB each once grew
the control plane by 195 MiB and its log by 200 MB).
"""

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from meshserve.mesh.resources import TYPES
from meshserve.mesh.snapshot import Snapshot

log = logging.getLogger(__name__)

KEEP_NACKS = 100
MAX_REASON = 1024  # characters of a NACK's reason kept and logged


class SnapshotCache:
    """Holds the snapshot being served; streams wait on it for changes."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.changed_at = time.monotonic()
        self._changed = asyncio.Event()
        self.nacks: list[str] = []  # the last KEEP_NACKS reasons
        self.nack_count = 0

    def nacked(self, reason: str) -> None:
        if len(reason) > MAX_REASON:
            reason = reason[:MAX_REASON - 1] + "…"
        log.warning("NACK: %s", reason)
        self.nack_count += 1
        self.nacks.append(reason)
        del self.nacks[:-KEEP_NACKS]

    def set(self, snapshot: Snapshot) -> bool:
        if snapshot.version == self.snapshot.version:
            return False
        self.snapshot = snapshot
        self.changed_at = time.monotonic()
        self._changed.set()
        self._changed = asyncio.Event()
        log.info("serving snapshot %s", snapshot.version)
        return True

    async def changed(self) -> None:
        await self._changed.wait()


@dataclass
class Subscription:
    names: set[str] = field(default_factory=set)
    sent_names: set[str] | None = None
    sent_version: str = ""


class _Owed:
    """The types a stream owes its client a look at, in order, each once however often it is
    asked for before the look (a client that sends and never reads holds one entry per type,
    not one per request); None once the client is done."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._queued: set[str] = set()

    def put(self, kind: str) -> None:
        if kind not in self._queued:
            self._queued.add(kind)
            self._queue.put_nowait(kind)

    def end(self) -> None:
        self._queue.put_nowait(None)

    async def get(self) -> str | None:
        kind = await self._queue.get()
        self._queued.discard(kind)
        return kind


class AggregatedDiscovery(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, cache: SnapshotCache) -> None:
        self._cache = cache
        self._nonces = itertools.count(1)

    def _response(self, kind: str, subscription: Subscription) -> discovery_pb2.DiscoveryResponse:
        snapshot = self._cache.snapshot
        subscription.sent_version = snapshot.version
        subscription.sent_names = set(subscription.names)
        return discovery_pb2.DiscoveryResponse(
            version_info=snapshot.version, type_url=kind, nonce=str(next(self._nonces)),
            resources=snapshot.named(kind, subscription.names))

    async def StreamAggregatedResources(self, request_iterator, context):
        subscriptions: dict[str, Subscription] = {}
        outbox = _Owed()

        async def read() -> None:
            node = ""
            async for request in request_iterator:
                node = request.node.id or node
                if request.type_url not in TYPES:
                    continue  # nothing of it is served: nothing of it is kept
                subscription = subscriptions.setdefault(request.type_url, Subscription())
                subscription.names = set(request.resource_names)
                if request.HasField("error_detail"):
                    self._cache.nacked(f"{node} rejected {request.type_url} version "
                                       f"{subscription.sent_version}: "
                                       f"{request.error_detail.message}")
                    continue
                outbox.put(request.type_url)
            outbox.end()

        async def watch() -> None:
            while True:
                await self._cache.changed()
                for kind in list(subscriptions):
                    outbox.put(kind)

        reader = asyncio.create_task(read())
        watcher = asyncio.create_task(watch())
        try:
            while (kind := await outbox.get()) is not None:
                subscription = subscriptions[kind]
                if (subscription.sent_version == self._cache.snapshot.version
                        and subscription.sent_names == subscription.names):
                    continue  # an ACK of what the client already has
                yield self._response(kind, subscription)
        finally:
            reader.cancel()
            watcher.cancel()
