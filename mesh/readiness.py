"""Which model versions can answer now: the control plane follows every batcher's health.

Each registered batcher is watched with `grpc.health.v1.Health/Watch` (a stream the batcher
pushes on), and checked every few seconds while it is serving, so that a batcher which stopped
answering at all (a SIGSTOP, a hung event loop) counts as not serving until it answers again
(`meshserve.common.liveness`); a batcher is SERVING when one of its compute replicas is loaded
and warm, and says why beside NOT_SERVING when a compute refused its model at load. A version is
ready when one of its batchers is. `table` (pure) lists every version the traffic policies name,
with its weight, its readiness and, when it is not ready, the reason one of its batchers gave;
the ingress follows that table (`WatchReadiness`) to answer ServerReady, to refuse requests for
a version that cannot answer, at once, and to say why in its repository index.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

from meshserve.common.liveness import Standing, answers, keep_checking
from meshserve.common.tls import ReloadingChannel, TlsFiles
from meshserve.common.upstream import follow_stream
from meshserve.mesh.policy import Endpoint, TrafficPolicy
from meshserve.protocol import health_pb2
from meshserve.protocol.health_pb2_grpc import HealthStub

RETRY_S = 0.5  # between attempts to watch a batcher that cannot be reached
# How long a control plane that has just started holds its first table back while it learns
# its batchers' health (an unreachable batcher's first failed attempt counts as learnt).
FIRST_TABLE_WAIT_S = 3.0


@dataclass(frozen=True)
class VersionState:
    model: str
    version: str
    weight: int
    ready: bool
    reason: str = ""  # why it is not ready, as one of its batchers said; "" when none did


def table(policies: dict[str, TrafficPolicy], endpoints: Iterable[Endpoint],
          serving: dict[str, bool],
          reasons: dict[str, str] | None = None) -> tuple[VersionState, ...]:
    """Every version the policies name that carries traffic or has a batcher to pin it to,
    in order, ready when one of its endpoints is serving (`serving`: by address); one that is
    not ready with the reason its first endpoint that gave one gave (`reasons`: by address)."""
    endpoints = list(endpoints)
    reasons = reasons or {}
    deployed = {(e.model, e.version) for e in endpoints}
    ready = {(e.model, e.version) for e in endpoints if serving.get(e.address)}
    why: dict[tuple[str, str], str] = {}
    for e in endpoints:
        if reasons.get(e.address):
            why.setdefault((e.model, e.version), reasons[e.address])
    return tuple(VersionState(model, version, weight, (model, version) in ready,
                              "" if (model, version) in ready else why.get((model, version), ""))
                 for model, policy in sorted(policies.items())
                 for version, weight in sorted(policy.weights.items(), key=lambda v: int(v[0]))
                 if weight or (model, version) in deployed)


class Changes:
    """A broadcast of "something changed": take `event` before reading the state, then wait
    on it; each change sets it and starts a fresh one."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def notify(self) -> None:
        self.event.set()
        self.event = asyncio.Event()


class BatcherHealth:
    """Follows the health of each batcher endpoint it is given (`follow`), over one
    mutual-TLS channel per batcher; `changes` is told whenever one flips."""

    def __init__(self, tls: TlsFiles, identity: str, changes: Changes) -> None:
        self._tls = tls
        self._identity = identity
        self._changes = changes
        self.serving: dict[str, bool] = {}
        self.reasons: dict[str, str] = {}  # why a batcher is not serving, when it said
        self._watches: dict[str, asyncio.Task] = {}

    def follow(self, addresses: Iterable[str]) -> None:
        """Watch these batchers (and stop watching any other)."""
        wanted = set(addresses)
        for address in list(self._watches):
            if address not in wanted:
                self._watches.pop(address).cancel()
                self.report(address, False)
        for address in wanted - set(self._watches):
            self._watches[address] = asyncio.get_running_loop().create_task(
                self._watch(address))

    def knows(self, addresses: Iterable[str]) -> bool:
        """Whether each of these batchers has answered, or failed to, at least once."""
        return all(address in self.serving for address in addresses)

    def report(self, address: str, serving: bool, reason: str = "") -> None:
        """What watching `address` learnt: serving or not, and why not when it said."""
        reason = "" if serving else reason
        if (self.serving.get(address), self.reasons.get(address, "")) != (serving, reason):
            self.serving[address] = serving
            self.reasons[address] = reason
            self._changes.notify()

    async def _watch(self, address: str) -> None:
        channel = ReloadingChannel(address, self._tls, self._identity)
        standing = Standing()

        def heard(reply: health_pb2.HealthCheckResponse | None) -> None:
            standing.heard(reply)
            self.report(address, standing.serving, standing.reason)

        checks = asyncio.get_running_loop().create_task(keep_checking(
            lambda timeout: answers(channel.channel, timeout), standing,
            lambda: self.report(address, standing.serving, standing.reason)))
        try:
            await follow_stream(
                channel,
                lambda channel: HealthStub(channel).Watch(health_pb2.HealthCheckRequest()),
                heard, lambda: heard(None), RETRY_S)
        finally:
            checks.cancel()
            self.serving.pop(address, None)
            self.reasons.pop(address, None)

    async def close(self) -> None:
        for task in self._watches.values():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._watches.values(), return_exceptions=True)
        self._watches.clear()


class Readiness:
    """The readiness table of the mesh's state (`store`: policies and endpoints), kept
    current by following each endpoint's health; `changes` is told of every change (the
    control plane tells it of state changes too)."""

    def __init__(self, store, changes: Changes, tls: TlsFiles, identity: str) -> None:
        self._store = store
        self.changes = changes
        self.health = BatcherHealth(tls, identity, changes)

    def table(self) -> tuple[VersionState, ...]:
        return table(self._store.policies(), self._store.endpoints(), self.health.serving,
                     self.health.reasons)

    async def known(self, timeout: float = FIRST_TABLE_WAIT_S) -> None:
        """Return once the health of every registered batcher is known, or after `timeout`:
        until then a control plane that has just started would report as not ready every
        version it has not asked yet, and each ingress would refuse their requests."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while True:
            event = self.changes.event
            left = give_up - loop.time()
            if left <= 0 or self.health.knows(e.address for e in self._store.endpoints()):
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), left)

    async def follow(self) -> None:
        """Watch the registered batchers, again whenever the state changes."""
        while True:
            event = self.changes.event
            self.health.follow(e.address for e in self._store.endpoints())
            await event.wait()

    async def close(self) -> None:
        await self.health.close()
