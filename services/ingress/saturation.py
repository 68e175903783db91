"""The edge's bound on a model's waiting requests, so that a burst is refused at once.

Each hop keeps one group waiting for its first answer per model and version pin; what
arrives meanwhile waits for the next group. Unbounded, that wait is where a burst queued: the
ingress held thousands of requests for seconds, and the batcher's full queue refused them only
after they had crossed the router. So the ingress lets at most the model's `max_queue_size` (its
`dynamic_batching.default_queue_policy`, the bound each batcher keeps as well) requests wait
per model and pin; an arrival beyond it is refused at once, RESOURCE_EXHAUSTED, with a retry
hint of the last group's round trip (by then the waiting requests have left).

Requests more urgent than the model's least urgent priority level are never refused here:
they go on, and the batcher sheds less urgent ones to make room for them. A model without a
`max_queue_size` waits unbounded, as at the batcher.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.common.errors import ResourceExhausted
from meshserve.common.priority import priority_level

MIN_RETRY_AFTER_S = 0.05  # as the batcher's hint when it has no batch latency yet


@dataclass(frozen=True)
class EdgeBound:
    model: str
    max_waiting: int  # 0: unbounded
    levels: int
    default_level: int

    @classmethod
    def of(cls, model: str, config) -> EdgeBound:
        """The bound of a model's `ModelConfig`: its least urgent level's `max_queue_size`
        (from `priority_queue_policy`, or `default_queue_policy`)."""
        dynamic = config.dynamic_batching
        levels = max(dynamic.priority_levels, 1)
        least = dynamic.priority_queue_policy.get(levels, dynamic.default_queue_policy)
        return cls(model, least.max_queue_size, levels, dynamic.default_priority_level)

    def admit(self, priority: int, waiting: int, round_trip: float) -> None:
        """Raise ResourceExhausted when `waiting` requests already wait and one of
        `priority` would join them at the least urgent level."""
        if (self.max_waiting and waiting >= self.max_waiting
                and priority_level(priority, self.levels, self.default_level) == self.levels):
            raise ResourceExhausted(
                f"model '{self.model}' is saturated: {waiting} requests wait at the ingress "
                f"(max_queue_size {self.max_waiting})", max(round_trip, MIN_RETRY_AFTER_S))
