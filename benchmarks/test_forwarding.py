"""Group forwarding, the internal hop's hot path: building an InferGroup of 32 items, the
whole `GroupForwarder.forward` round trip against an upstream that answers at once, and
turning item results back into errors."""

import asyncio
import time

import pytest

from benchmarks.inputs import batch_response, infer_request
from meshserve.common.errors import DeadlineExceeded, ServingError
from meshserve.common.forwarding import (
    Entry,
    GroupForwarder,
    build_group,
    error_result,
    raise_for,
)
from meshserve.protocol.groups_pb2 import InferGroup, InferGroupResult, ItemResult

ITEMS = 32
DEADLINE_S = 3600.0  # far enough that no item expires during the session


def _entries(count=ITEMS):
    """Ingress entries: a validated mlp request per item, with a deadline, as `infer` makes."""
    deadline = time.monotonic() + DEADLINE_S
    return [Entry(infer_request("mlp", seed=n), f"ab12cd34-{n}", deadline)
            for n in range(count)]


@pytest.mark.benchmark(group="forwarding.group")
def test_build_group_32(benchmark):
    entries = _entries()
    body, expired, longest = benchmark(
        lambda: build_group("mlp", "", [entries], time.monotonic(), []))
    assert len(InferGroup.FromString(b"".join(body)).items) == ITEMS and not expired and longest > 0


class ImmediateUpstream:
    """A group call that answers every item at once with a prebuilt mlp response."""

    def __init__(self):
        self.sizes = []
        self._replies = {}
        self._ok = ItemResult(response=batch_response("mlp", 1))

    async def call(self, body, timeout, early=None):
        size = len(InferGroup.FromString(b"".join(body)).items)
        self.sizes.append(size)
        reply = self._replies.get(size)
        if reply is None:
            reply = self._replies[size] = InferGroupResult(results=[self._ok] * size)
        return reply


@pytest.fixture
def loop():
    """A private event loop, one `run_until_complete` per round (the tests are not async)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.mark.benchmark(group="forwarding.forward")
def test_loop_round_baseline(benchmark, loop):
    """The event-loop cost every `forward` round below includes: subtract it."""
    async def nothing():
        return None

    benchmark(lambda: loop.run_until_complete(nothing()))


@pytest.mark.benchmark(group="forwarding.forward")
def test_forward_one_call_32_entries(benchmark, loop):
    upstream = ImmediateUpstream()
    forwarder = GroupForwarder(upstream.call, "mlp", "router")
    entries = _entries()
    results = benchmark(lambda: loop.run_until_complete(forwarder.forward(entries)))
    assert len(results) == ITEMS and set(upstream.sizes) == {ITEMS}


@pytest.mark.benchmark(group="forwarding.forward")
def test_forward_32_concurrent_callers(benchmark, loop):
    """32 ingress requests arriving together: each forwards its own entry; they leave as
    one group."""
    upstream = ImmediateUpstream()
    forwarder = GroupForwarder(upstream.call, "mlp", "router")
    entries = _entries()

    async def callers():
        return await asyncio.gather(*(forwarder.forward([entry]) for entry in entries))

    results = benchmark(lambda: loop.run_until_complete(callers()))
    assert len(results) == ITEMS and set(upstream.sizes) == {ITEMS}


@pytest.mark.benchmark(group="forwarding.raise_for")
def test_raise_for_ok(benchmark):
    benchmark(raise_for, ItemResult(response=batch_response("mlp", 1)))


@pytest.mark.benchmark(group="forwarding.raise_for")
def test_raise_for_error(benchmark):
    failed = error_result(DeadlineExceeded("deadline exceeded while queued for a batch"))

    def raised():
        try:
            raise_for(failed)
        except ServingError as error:
            return error
        return None

    assert isinstance(benchmark(raised), DeadlineExceeded)
