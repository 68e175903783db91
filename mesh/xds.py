"""The Aggregated Discovery Service (state of the world) over one current snapshot.

Each stream remembers, per resource type, the names the client subscribed to and the
version it last acknowledged. A new snapshot, or a new subscription, sends that type again.
ACK: the client echoes our version and nonce. NACK: `error_detail` is set; we log the reason
and the client keeps its last good configuration.
"""

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from meshserve.mesh.snapshot import Snapshot

log = logging.getLogger(__name__)


class SnapshotCache:
    """Holds the snapshot being served; streams wait on it for changes."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.changed_at = time.monotonic()
        self._changed = asyncio.Event()
        self.nacks: list[str] = []

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
        outbox: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            node = ""
            async for request in request_iterator:
                node = request.node.id or node
                subscription = subscriptions.setdefault(request.type_url, Subscription())
                subscription.names = set(request.resource_names)
                if request.HasField("error_detail"):
                    reason = (f"{node} rejected {request.type_url} version "
                              f"{subscription.sent_version}: {request.error_detail.message}")
                    log.warning("NACK: %s", reason)
                    self._cache.nacks.append(reason)
                    continue
                outbox.put_nowait(request.type_url)
            outbox.put_nowait(None)

        async def watch() -> None:
            while True:
                await self._cache.changed()
                for kind in list(subscriptions):
                    outbox.put_nowait(kind)

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
