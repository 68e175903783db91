"""Which model versions can answer now, as the control plane reports it, and what follows.

The control plane watches every batcher's health and streams a table of the versions its
traffic policies name (`Admin.WatchReadiness`); the ingress keeps the latest table (a lost
control plane leaves it as it was) and reads it without a call:

- ServerReady (and the ingress's own health, which its probes read): with the strict rule
  (the default, as Triton's), every version in the table can answer; with "any", at least
  one version can (a partly loaded mesh takes traffic, as Triton's non-strict readiness).
- A request for a version that cannot answer now is refused at once, UNAVAILABLE with a
  retry hint, without travelling through the router and a batcher: pinned requests when
  their version is not ready, unpinned ones when no version that carries weight is.
- Why a version cannot answer, when its compute said (it refused its model at load: the file
  and the error): the repository index's `reason`, and the refusal of a request for it (an
  unpinned one gives the reasons of the versions that carry traffic).

Only the models the ingress serves count (`served`, its repository's): a traffic policy in the
control plane's store outlives its model (`up` started on another repository with the same
data directory), and no batcher will ever make such a model's versions ready.

Before the first table arrives nothing is refused, and the server is not ready.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

import grpc

from meshserve.common.errors import Unavailable
from meshserve.common.liveness import bounded
from meshserve.common.tls import ReloadingChannel, TlsFiles
from meshserve.protocol import admin_pb2
from meshserve.protocol.admin_pb2_grpc import AdminStub

log = logging.getLogger(__name__)

STRICT, ANY = "strict", "any"
RULES = (STRICT, ANY)
RETRY_AFTER_S = 1.0  # the hint on a refusal: about how long a compute takes to come back
RECONNECT_S = 0.5


@dataclass(frozen=True)
class Version:
    weight: int
    ready: bool
    reason: str = ""  # why it is not ready, when its compute said


def not_ready(model: str, version: str, why: str,
              retry_after: float | None = None) -> Unavailable:
    return Unavailable(f"model '{model}' version '{version}' is not ready: {why}", retry_after)


class Readiness:
    """The latest table, by model and version (pure: `update` takes what arrived)."""

    def __init__(self, rule: str = STRICT, served: Collection[str] | None = None) -> None:
        """`served`: the models whose versions count (None: every model in the table)."""
        if rule not in RULES:
            raise ValueError(f"readiness rule '{rule}' is not one of {', '.join(RULES)}")
        self.rule = rule
        self.served = served
        self.models: dict[str, dict[str, Version]] | None = None  # None: no table yet

    def update(self, table: admin_pb2.Readiness) -> None:
        models: dict[str, dict[str, Version]] = {}
        for entry in table.versions:
            if self.served is not None and entry.model not in self.served:
                continue
            models.setdefault(entry.model, {})[entry.version] = Version(
                entry.weight, entry.ready, "" if entry.ready else bounded(entry.reason))
        self.models = models

    def refusal(self, model: str, version: str) -> str:
        """Why `version` of `model` cannot answer, as its compute said when it refused the
        model; "" when it can, nothing was said, or the table does not name it."""
        versions = None if self.models is None else self.models.get(model)
        state = None if versions is None else versions.get(version)
        return "" if state is None else state.reason

    def ready(self) -> bool:
        """Whether the server is ready under the rule."""
        if self.models is None:
            return False
        states = [v.ready for versions in self.models.values() for v in versions.values()]
        return all(states) if self.rule == STRICT else any(states)

    def admit(self, model: str, version: str) -> None:
        """Raise Unavailable when the request cannot be answered now (see the module)."""
        versions = None if self.models is None else self.models.get(model)
        if versions is None:
            return
        if version:
            state = versions.get(version)
            if state is not None and not state.ready:
                raise not_ready(model, version, state.reason or
                                "no compute replica of it can answer now", RETRY_AFTER_S)
            return
        weighted = [v for v in versions.values() if v.weight]
        if weighted and not any(v.ready for v in weighted):
            why = "".join(f"; {v.reason}" for v in weighted if v.reason)
            raise Unavailable(f"model '{model}' is not ready: no version that carries its "
                              f"traffic has a compute replica that can answer now{why}",
                              RETRY_AFTER_S)


async def follow(readiness: Readiness, control_plane: str, tls: TlsFiles, identity: str,
                 on_change: Callable[[], None]) -> None:
    """Keep `readiness` current from the control plane's stream, reconnecting when it ends;
    `on_change()` after each table."""
    channel = ReloadingChannel(control_plane, tls, identity)
    try:
        while True:
            channel.refresh()
            try:
                stream = AdminStub(channel.channel).WatchReadiness(admin_pb2.ReadinessRequest())
                async for table in stream:
                    readiness.update(table)
                    on_change()
            except grpc.aio.AioRpcError as error:
                log.debug("readiness from the control plane: %s", error.code().name)
            await asyncio.sleep(RECONNECT_S)
    finally:
        await channel.close()
