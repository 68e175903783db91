"""The models the mesh routes: those the control plane holds a traffic policy for, as its
last Status said (the clock and the question are injected).

The router reaches a model through a channel of its own, resolved by gRPC's xDS client,
which subscribes to the model's resources: about 1.6 MiB and a thread for as long as the
router runs. It makes one only for a model the control plane routes, so that calls naming
models the mesh does not serve (an operator's typo, a peer that misbehaves) cost nothing
that lasts: 240 unknown names once held 390 MiB and 254 threads.

A model the last answer did not list is asked about again, at most every `recheck` seconds
(one question at a time, whoever waits for it), so a model given its policy a moment ago
is routed without waiting for the router's next look at the control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

log = logging.getLogger(__name__)

RECHECK_S = 1.0


class KnownModels:
    """`await known.knows(model, wait)`; `heard(names)` records an answer to a question asked
    elsewhere (the router's periodic look at the control plane)."""

    def __init__(self, ask: Callable[[], Awaitable[Iterable[str]]],
                 clock: Callable[[], float], recheck: float = RECHECK_S) -> None:
        self._ask = ask
        self._clock = clock
        self._recheck = recheck
        self.names: frozenset[str] | None = None  # None: the control plane has not answered
        self._fresh_at = float("-inf")  # when the names were last answered, or asked in vain
        self._asking: asyncio.Future | None = None

    def heard(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)
        self._fresh_at = self._clock()

    async def knows(self, model: str, wait: float) -> bool:
        """Whether the control plane routes `model`: at once when its last answer listed it,
        or when that answer is less than `recheck` seconds old; else after asking again,
        waiting at most `wait` seconds for the answer."""
        if self.names is not None and model in self.names:
            return True
        if self._clock() - self._fresh_at < self._recheck:
            return False
        if self._asking is None or self._asking.done():
            self._asking = asyncio.ensure_future(self._ask_now())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._asking), max(wait, 0.0))
        return self.names is not None and model in self.names

    async def _ask_now(self) -> None:
        try:
            self.heard(await self._ask())
        except Exception as error:  # noqa: BLE001 — the control plane away: asked in vain
            self._fresh_at = self._clock()
            log.debug("the control plane did not say which models it routes: %s", error)
