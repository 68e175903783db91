"""Shadow traffic: a share of a model's unpinned requests is copied to a shadow version.

The copies leave beside the primary groups and are never awaited by the client's path;
their answers are compared with the primary's and then discarded. The comparison counts
(per model and shadow version) are what the router reports to the control plane.
"""

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy

from meshserve.common.arrays import NUMPY_DTYPE
from meshserve.common.forwarding import GroupHead
from meshserve.protocol.groups_pb2 import InferGroup, ItemResult

TOLERANCE = 1e-5


@dataclass
class Comparison:
    compared: int = 0
    differing: int = 0
    max_abs_diff: float = 0.0


def difference(primary: ItemResult, shadow: ItemResult) -> float | None:
    """Largest absolute difference between two answers; None when one of them failed."""
    if primary.code or shadow.code:
        return None
    a, b = primary.response, shadow.response
    if [(t.name, list(t.shape)) for t in a.outputs] != [(t.name, list(t.shape))
                                                         for t in b.outputs]:
        return float("inf")
    largest = 0.0
    for tensor, left, right in zip(a.outputs, a.raw_output_contents, b.raw_output_contents):
        dtype = NUMPY_DTYPE.get(tensor.datatype)
        if dtype is None:  # BYTES and BF16: equal or not
            largest = max(largest, 0.0 if left == right else float("inf"))
            continue
        x = numpy.frombuffer(left, dtype).astype(numpy.float64)
        y = numpy.frombuffer(right, dtype).astype(numpy.float64)
        if x.size:
            largest = max(largest, float(numpy.abs(x - y).max()))
    return largest


class Shadowing:
    """Which models are shadowed, the mirroring itself, and the comparison counts."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.targets: dict[str, tuple[str, float]] = {}  # model → (version, percent)
        self.counts: dict[tuple[str, str], Comparison] = {}
        self._rng = rng or random.Random()
        self._tasks: set[asyncio.Task] = set()

    def shadows(self, group: GroupHead | InferGroup) -> bool:
        """Whether `group` may be copied: it is unpinned and its model has a shadow."""
        return not group.version and group.model_name in self.targets

    def mirror(self, group: InferGroup,
               send: Callable[[InferGroup], Awaitable[list[ItemResult]]]) -> asyncio.Task | None:
        """Start a copy of `group` pinned to its model's shadow version, if it is chosen."""
        target = self.targets.get(group.model_name) if not group.version else None
        if target is None or self._rng.random() * 100 >= target[1]:
            return None
        copy = InferGroup()
        copy.CopyFrom(group)
        copy.version = target[0]
        task = asyncio.get_running_loop().create_task(send(copy))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def compare(self, model: str, task: asyncio.Task, primary: list[ItemResult]) -> None:
        """Once the shadow answers arrive, count how they differ from the primary's."""
        version = self.targets.get(model, ("?", 0))[0]

        def done(finished: asyncio.Task) -> None:
            if finished.cancelled() or finished.exception() is not None:
                return
            counts = self.counts.setdefault((model, version), Comparison())
            for ours, theirs in zip(primary, finished.result()):
                gap = difference(ours, theirs)
                if gap is None:
                    continue
                counts.compared += 1
                counts.differing += gap > TOLERANCE
                counts.max_abs_diff = max(counts.max_abs_diff, gap)

        task.add_done_callback(done)

    def take_counts(self) -> dict[tuple[str, str], Comparison]:
        counts, self.counts = self.counts, {}
        return counts

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
