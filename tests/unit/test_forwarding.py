"""Tests of group forwarding with a fake group call (no gRPC server, no network)."""

import asyncio
import contextlib
import random
import time

import grpc
import pytest
from google.protobuf.message import DecodeError

from meshserve.common import errors
from meshserve.common.forwarding import (
    CODE_NUMBER,
    LINGER_FROM,
    Entry,
    GroupForwarder,
    GroupHead,
    build_group,
    deadline_of,
    error_result,
    raise_for,
    serialized_group,
)
from meshserve.common.streams import StreamBroken
from meshserve.protocol.groups_pb2 import GroupItem, InferGroup, InferGroupResult, ItemResult
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest, ModelInferResponse

UPSTREAM = "batcher-7"


class FakeUpstream:
    """Records each group call; answers every item with a response whose id is its request_id.

    With `gated`, each call waits for `release` before answering.
    """

    def __init__(self, *, gated: bool = False, extra: int = 0, error: Exception | None = None):
        self.groups: list[list[str]] = []
        self.item_timeouts: list[list[int]] = []
        self.timeouts: list[float | None] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        if not gated:
            self.release.set()
        self.extra = extra
        self.error = error
        self.given_up: list[list[str]] = []  # the groups whose call was cancelled

    async def call(self, body: list[bytes], timeout: float | None,
                   early=None) -> InferGroupResult:
        group = InferGroup.FromString(b"".join(body))
        assert group.model_name == "mlp"
        self.groups.append([item.request_id for item in group.items])
        self.item_timeouts.append([item.timeout_us for item in group.items])
        self.timeouts.append(timeout)
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.given_up.append(self.groups[-1])
            raise
        if self.error is not None:
            raise self.error
        ids = [item.request_id for item in group.items]
        if self.extra > 0:
            ids += ["surplus"] * self.extra
        elif self.extra < 0:
            ids = ids[:self.extra]
        return InferGroupResult(results=[
            ItemResult(response=ModelInferResponse(id=rid, model_name="mlp")) for rid in ids])


def entry(rid: str, deadline: float | None = None) -> Entry:
    return Entry(ModelInferRequest(model_name="mlp", id=rid), rid, deadline)


def ids_of(results: list[ItemResult]) -> list[str]:
    return [r.response.id for r in results]


async def settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


# --- coalescing -------------------------------------------------------------------------

async def test_calls_during_flight_coalesce_into_one_next_group():
    fake = FakeUpstream(gated=True)
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM)
    first = asyncio.create_task(forwarder.forward([entry("r0")]))
    await asyncio.wait_for(fake.started.wait(), 2)
    rest = [asyncio.create_task(forwarder.forward([entry(f"r{i}")])) for i in range(1, 11)]
    await settle()
    assert fake.groups == [["r0"]]
    fake.release.set()
    results = await asyncio.wait_for(asyncio.gather(first, *rest), 2)
    assert [len(group) for group in fake.groups] == [1, 10]
    assert fake.groups[1] == [f"r{i}" for i in range(1, 11)]
    assert [ids_of(r) for r in results] == [[f"r{i}"] for i in range(11)]
    assert all(r[0].code == 0 for r in results)


async def test_waiting_counts_the_entries_that_wait_for_the_next_group():
    fake = FakeUpstream(gated=True)
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM, max_group=3)
    first = asyncio.create_task(forwarder.forward([entry("r0")]))
    await asyncio.wait_for(fake.started.wait(), 2)
    assert forwarder.waiting == 0  # r0 left at once
    rest = [asyncio.create_task(forwarder.forward([entry(f"r{i}"), entry(f"s{i}")]))
            for i in range(1, 4)]
    await settle()
    assert forwarder.waiting == 6
    fake.release.set()
    await asyncio.wait_for(asyncio.gather(first, *rest), 2)
    assert [len(group) for group in fake.groups] == [1, 2, 2, 2]
    assert forwarder.waiting == 0


async def test_groups_carry_at_most_max_group_bytes_of_tensors():
    """Large requests waiting together leave in groups under the byte bound (a request larger
    than the bound alone), never as one group past what a message between hops may carry."""
    fake = FakeUpstream(gated=True)
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM, max_group_bytes=1000)

    def sized(rid: str, size: int) -> Entry:
        return entry(rid)._replace(size=size)

    first = asyncio.create_task(forwarder.forward([sized("r0", 10)]))
    await asyncio.wait_for(fake.started.wait(), 2)
    sizes = {"a": 400, "b": 400, "c": 400, "d": 1500, "e": 100, "f": 100}
    rest = [asyncio.create_task(forwarder.forward([sized(rid, size)]))
            for rid, size in sizes.items()]
    await settle()
    fake.release.set()
    results = await asyncio.wait_for(asyncio.gather(first, *rest), 2)
    assert fake.groups == [["r0"], ["a", "b"], ["c"], ["d"], ["e", "f"]]
    assert [ids_of(r) for r in results] == [["r0"], *([rid] for rid in sizes)]


async def test_a_request_past_its_deadline_while_it_waits_is_answered_then():
    """Behind a group in flight (its model slow, or overloaded), a waiting request is told its
    deadline passed when it passes, not when the group ahead comes back; it is never sent, and
    one with a later deadline still goes in the next group."""
    fake = FakeUpstream(gated=True)
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM)
    first = asyncio.create_task(forwarder.forward([entry("r0")]))
    await asyncio.wait_for(fake.started.wait(), 2)
    soon = asyncio.create_task(forwarder.forward([entry("soon", time.monotonic() + 0.05)]))
    later = asyncio.create_task(forwarder.forward([entry("later", time.monotonic() + 30)]))
    [expired] = await asyncio.wait_for(soon, 2)
    assert not first.done() and not later.done()
    assert expired.code == CODE_NUMBER["DEADLINE_EXCEEDED"]
    assert expired.message == f"deadline exceeded before the request left the {UPSTREAM} queue"
    assert forwarder.waiting == 1
    fake.release.set()
    await asyncio.wait_for(asyncio.gather(first, later), 2)
    assert fake.groups == [["r0"], ["later"]]


async def test_round_trip_is_how_long_the_last_group_took():
    fake = FakeUpstream(gated=True)
    now = [10.0]
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM, clock=lambda: now[0])
    call = asyncio.create_task(forwarder.forward([entry("r0")]))
    await asyncio.wait_for(fake.started.wait(), 2)
    assert forwarder.round_trip == 0.0
    now[0] = 10.25
    fake.release.set()
    await asyncio.wait_for(call, 2)
    assert forwarder.round_trip == 0.25


async def test_idle_sends_a_group_of_one_at_once():
    fake = FakeUpstream()
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM)
    assert ids_of(await asyncio.wait_for(forwarder.forward([entry("a")]), 2)) == ["a"]
    assert ids_of(await asyncio.wait_for(forwarder.forward([entry("b")]), 2)) == ["b"]
    assert fake.groups == [["a"], ["b"]]
    assert fake.timeouts == [None, None]


async def test_entries_of_one_forward_come_back_in_order():
    fake = FakeUpstream()
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM)
    results = await asyncio.wait_for(
        asyncio.gather(forwarder.forward([entry("a"), entry("b"), entry("c")]),
                       forwarder.forward([entry("d")]),
                       forwarder.forward([entry("e"), entry("f")])), 2)
    assert fake.groups == [["a", "b", "c", "d", "e", "f"]]
    assert [ids_of(r) for r in results] == [["a", "b", "c"], ["d"], ["e", "f"]]


@pytest.mark.parametrize("parcels, max_group, groups", [
    pytest.param([1] * 10, 4, [4, 4, 2], id="ten-singles-by-4"),
    pytest.param([3, 3, 1], 4, [3, 4], id="parcels-not-split"),
    pytest.param([6, 1], 4, [6, 1], id="oversized-parcel-goes-alone"),
    pytest.param([2, 2, 2], 512, [6], id="default-bound"),
])
async def test_max_group_bounds_groups(parcels, max_group, groups):
    fake = FakeUpstream()
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM, max_group=max_group)
    batches, n = [], 0
    for size in parcels:
        batches.append([entry(f"r{n + k}") for k in range(size)])
        n += size
    results = await asyncio.wait_for(
        asyncio.gather(*(forwarder.forward(b) for b in batches)), 2)
    assert [len(group) for group in fake.groups] == groups
    assert [ids_of(r) for r in results] == [[e.request_id for e in b] for b in batches]


async def test_max_in_flight_two_runs_two_calls_at_once():
    fake = FakeUpstream(gated=True)
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM, max_in_flight=2)
    tasks = [asyncio.create_task(forwarder.forward([entry("a")]))]
    await settle()
    tasks.append(asyncio.create_task(forwarder.forward([entry("b")])))
    await settle()
    assert fake.groups == [["a"], ["b"]]
    tasks += [asyncio.create_task(forwarder.forward([entry(x)])) for x in "cde"]
    await settle()
    fake.release.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert fake.groups == [["a"], ["b"], ["c", "d", "e"]]
    assert [ids_of(r) for r in results] == [["a"], ["b"], ["c"], ["d"], ["e"]]


# --- callers that leave -------------------------------------------------------------------

async def test_a_group_whose_every_caller_left_is_given_up_upstream():
    fake = FakeUpstream(gated=True)
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM)
    pair = [asyncio.create_task(forwarder.forward([entry(f"r{i}")])) for i in (0, 1)]
    await asyncio.wait_for(fake.started.wait(), 2)
    pair[0].cancel()
    await settle()
    assert fake.given_up == []  # r1 still waits
    pair[1].cancel()
    await settle()
    assert fake.groups == fake.given_up == [["r0", "r1"]]
    fake.release.set()
    assert ids_of(await asyncio.wait_for(forwarder.forward([entry("r2")]), 2)) == ["r2"]


async def test_a_caller_that_leaves_before_its_group_is_sent_is_not_sent():
    fake = FakeUpstream(gated=True)
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM)
    first = asyncio.create_task(forwarder.forward([entry("r0")]))
    await asyncio.wait_for(fake.started.wait(), 2)
    waiting = [asyncio.create_task(forwarder.forward([entry(f"r{i}")])) for i in (1, 2)]
    await settle()
    waiting[0].cancel()
    await settle()
    assert forwarder.waiting == 1
    fake.release.set()
    assert ids_of(await asyncio.wait_for(waiting[1], 2)) == ["r2"]
    assert ids_of(await first) == ["r0"]
    assert fake.groups == [["r0"], ["r2"]] and fake.given_up == []


async def test_a_group_goes_on_while_one_of_its_callers_still_waits():
    fake = FakeUpstream(gated=True)
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM)
    pair = [asyncio.create_task(forwarder.forward([entry(f"r{i}")])) for i in (1, 2)]
    await asyncio.wait_for(fake.started.wait(), 2)
    assert fake.groups == [["r1", "r2"]]
    pair[0].cancel()
    await settle()
    fake.release.set()
    assert ids_of(await asyncio.wait_for(pair[1], 2)) == ["r2"]
    assert fake.given_up == []


# --- lingering under load -----------------------------------------------------------------

async def after_a_group(size: int, waiting: int, linger: float):
    """A forwarder whose first group of `size` entries was answered after a round trip of 10 s
    (on its clock, now 10.0) while `waiting` entries waited: (forwarder, fake, clock, tasks).
    A group that lingers does so for at most `linger` (real) seconds."""
    fake = FakeUpstream(gated=True)
    now = [0.0]
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM, linger=linger,
                               clock=lambda: now[0])
    first = asyncio.create_task(forwarder.forward([entry(f"g{i}") for i in range(size)]))
    await asyncio.wait_for(fake.started.wait(), 2)
    tasks = [asyncio.create_task(forwarder.forward([entry(f"w{i}")])) for i in range(waiting)]
    await settle()
    now[0] = 10.0
    fake.release.set()
    await asyncio.wait_for(first, 2)
    await settle()
    return forwarder, fake, now, tasks


def arrive(forwarder: GroupForwarder, names: list[str]) -> list[asyncio.Task]:
    return [asyncio.create_task(forwarder.forward([entry(name)])) for name in names]


async def test_the_next_group_lingers_for_every_request_expected():
    # 10 answered while 2 waited: 12 are expected, so the next group waits (up to 5 s) for
    # the 10 answered callers to send again, and leaves as soon as they are there; later
    # arrivals take the next turn.
    forwarder, fake, _, tasks = await after_a_group(10, 2, linger=5.0)
    tasks += arrive(forwarder, [f"a{i}" for i in range(10)])
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    tasks = arrive(forwarder, ["b0", "b1"])
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert fake.groups[1:] == [["w0", "w1", *(f"a{i}" for i in range(10))], ["b0", "b1"]]


async def test_groups_that_take_turns_become_one():
    # Eight callers in two groups of 4 taking turns: when one is answered, the 4 waiting
    # linger for its 4 callers, and the eight leave together.
    forwarder, fake, _, tasks = await after_a_group(4, 4, linger=5.0)
    tasks += arrive(forwarder, ["a0", "a1", "a2", "a3"])
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert fake.groups[1:] == [["w0", "w1", "w2", "w3", "a0", "a1", "a2", "a3"]]


async def test_a_lingering_group_leaves_after_the_linger_with_what_came():
    forwarder, fake, _, tasks = await after_a_group(10, 2, linger=0.05)
    tasks += arrive(forwarder, ["a0"])
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert fake.groups[1:] == [["w0", "w1", "a0"]]


@pytest.mark.parametrize("size, linger", [(LINGER_FROM - 3, 5.0), (10, 0.0)],
                         ids=["fewer than LINGER_FROM expected", "linger 0"])
async def test_a_group_leaves_at_once(size, linger):
    forwarder, fake, _, tasks = await after_a_group(size, 2, linger=linger)
    tasks += arrive(forwarder, ["a0"])
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert fake.groups[1:] == [["w0", "w1"], ["a0"]]


async def test_a_request_long_after_the_last_answer_leaves_at_once():
    forwarder, fake, now, _ = await after_a_group(10, 0, linger=5.0)
    now[0] = 50.0  # four round trips after the last answer: the load has gone
    await asyncio.wait_for(asyncio.gather(*arrive(forwarder, ["a0"])), 2)
    assert fake.groups[1:] == [["a0"]]


# --- deadlines --------------------------------------------------------------------------

NOW = 1000.0  # the forwarder's monotonic clock, stopped: the remaining times it sends are exact


def stopped() -> float:
    return NOW


async def test_expired_entry_is_answered_without_being_sent():
    fake = FakeUpstream()
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM, clock=stopped)
    now = NOW
    results = await asyncio.wait_for(forwarder.forward(
        [entry("late", now - 1.0), entry("soon", now + 0.5), entry("later", now + 2.0)]), 2)
    assert fake.groups == [["soon", "later"]]
    late, soon, later = results
    assert late.code == 4
    assert late.message == (f"deadline exceeded before the request left the {UPSTREAM} queue")
    assert not late.HasField("response")
    assert (soon.code, soon.response.id, later.code, later.response.id) == (
        0, "soon", 0, "later")
    assert fake.timeouts[0] == 2.0
    assert fake.item_timeouts[0] == [500_000, 2_000_000]


async def test_any_entry_without_deadline_means_no_call_timeout():
    fake = FakeUpstream()
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM, clock=stopped)
    now = NOW
    await asyncio.wait_for(forwarder.forward([entry("a", now + 1.0), entry("b", None)]), 2)
    assert fake.timeouts == [None]
    assert fake.item_timeouts[0] == [1_000_000, 0]


GROUPS = {
    "empty": InferGroup(),
    "head only": InferGroup(model_name="mlp", version="2", timeout_us=5_000_000),
    "one item": InferGroup(model_name="mlp", items=[
        GroupItem(request=ModelInferRequest(model_name="mlp", raw_input_contents=[b"x" * 40]),
                  request_id="1")]),
    # items of one-, two- and three-byte lengths; the head after the items, as upb writes it
    "items of every length": InferGroup(model_name="cnn", version="1", timeout_us=2**40, items=[
        GroupItem(request=ModelInferRequest(raw_input_contents=[b"x" * size]), timeout_us=9)
        for size in (10, 120, 1_000, 20_000, 49_152)]),
    "with its group id": InferGroup(model_name="mlp", group_id=2**63),
}


@pytest.mark.parametrize("name", list(GROUPS))
def test_group_head_reads_what_a_parse_would(name):
    group = GROUPS[name]
    body = group.SerializeToString()
    framed = memoryview(b"\0" * 9 + body)[9:]  # as a stream's message hands it over
    assert GroupHead.read(body) == GroupHead.read(framed) == GroupHead.of(group) == (
        group.model_name, group.version, group.timeout_us, len(group.items))


def test_group_head_of_a_group_built_by_hand():
    entries = [Entry(ModelInferRequest(model_name="mlp", raw_input_contents=[b"y" * 300]), str(n),
                     None) for n in range(3)]
    body, _, _ = build_group("mlp", "1", [entries], 0.0, [])
    assert GroupHead.read(b"".join(body)) == ("mlp", "1", 0, 3)


def test_group_head_agrees_with_a_parse_wherever_the_parse_succeeds():
    """Bytes changed at random in a group: where protobuf parses them, the head says what the
    parsed group says; where it does not, the head may still be read (its items are not
    looked into), and otherwise raises ValueError, never anything else."""
    body = InferGroup(model_name="cnn", version="1", timeout_us=70_000, items=[
        GroupItem(request=ModelInferRequest(raw_input_contents=[b"x" * size]), request_id="7")
        for size in (10, 150)]).SerializeToString()
    rng = random.Random(12)
    parsed = 0
    for _ in range(3_000):
        changed = bytearray(body)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(changed))
            changed[at:at + rng.randint(0, 2)] = bytes(rng.randrange(256)
                                                       for _ in range(rng.randint(0, 2)))
        try:
            group = InferGroup.FromString(bytes(changed))
        except DecodeError:
            with contextlib.suppress(ValueError):
                GroupHead.read(changed)
            continue
        parsed += 1
        assert GroupHead.read(changed) == GroupHead.of(group)
    assert parsed > 300


@pytest.mark.parametrize("body", [b"\x12\x05abc", b"\x0a\x02\xff\xfe", b"\x12\x80",
                                  b"\x12\x80\x80\x80\x01"])
def test_group_head_refuses_what_is_not_a_group(body):
    # an item cut short, a model name not UTF-8, an item's length cut short, an item past the end
    with pytest.raises(ValueError):
        GroupHead.read(body)


def test_build_group_carries_each_entry_whole():
    first = Entry(ModelInferRequest(model_name="mlp", id="c1"), "r1", NOW + 0.25, 2,
                  "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    second = Entry(ModelInferRequest(model_name="mlp", id="c2"), "r2", None)
    sent: list[tuple[int, int]] = []
    body, expired, longest = build_group("mlp", "2", [[first], [second]], NOW, sent)
    group = InferGroup.FromString(b"".join(body))
    assert (group.model_name, group.version, group.timeout_us) == ("mlp", "2", 0)
    assert list(group.items) == [
        GroupItem(request=first.request, request_id="r1", priority=2,
                  traceparent=first.traceparent, timeout_us=250_000),
        GroupItem(request=second.request, request_id="r2", timeout_us=0)]
    assert (sent, expired, longest) == ([(0, 0), (1, 0)], [], None)


def test_serialized_group_joins_a_request_in_pieces_into_the_group_protobuf_would_write():
    """A request given in pieces (as the batcher gives its batch) is the request their
    bytes make; the head's fields and each item's other fields are kept."""
    request = ModelInferRequest(model_name="mlp", id="b")
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=[2, 3])
    whole = request.SerializeToString()
    head = InferGroup(model_name="mlp", version="2", timeout_us=5_000)
    item = GroupItem(request_id="r1", priority=1, traceparent="t", timeout_us=4_000)
    body = serialized_group(head, [([whole[:3], whole[3:9], whole[9:]], item),
                                   ([b""], GroupItem(request_id="r2"))])
    expected = InferGroup(model_name="mlp", version="2", timeout_us=5_000, items=[
        GroupItem(request=request, request_id="r1", priority=1, traceparent="t",
                  timeout_us=4_000),
        GroupItem(request=ModelInferRequest(), request_id="r2")])
    assert InferGroup.FromString(b"".join(body)) == expected


async def test_all_expired_makes_no_call():
    fake = FakeUpstream()
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM, clock=stopped)
    now = NOW
    results = await asyncio.wait_for(
        forwarder.forward([entry("x", now - 0.1), entry("y", now)]), 2)
    assert fake.groups == []
    assert [r.code for r in results] == [4, 4]


@pytest.mark.parametrize("timeout_us, arrived, expected", [
    (0, 5.0, None),
    (1_500_000, 10.0, 11.5),
    (250, 0.0, 0.00025),
])
def test_deadline_of(timeout_us, arrived, expected):
    assert deadline_of(timeout_us, arrived) == expected


@pytest.mark.parametrize("timeout_us, remaining, expected", [
    (0, None, None),
    (0, 2.0, 12.0),
    (1_500_000, 2.0, 11.5),
    (3_000_000, 2.0, 12.0),
])
def test_deadline_of_a_call_is_the_sooner_of_its_timeout_and_what_remains(
        timeout_us, remaining, expected):
    assert deadline_of(timeout_us, 10.0, remaining) == expected


# --- failures ---------------------------------------------------------------------------

@pytest.mark.parametrize("code, details, number, message", [
    pytest.param(grpc.StatusCode.UNAVAILABLE, "down", 14, f"{UPSTREAM} unavailable: down",
                 id="unavailable"),
    pytest.param(grpc.StatusCode.CANCELLED, "gone", 14, f"{UPSTREAM} unavailable: gone",
                 id="cancelled"),
    pytest.param(grpc.StatusCode.DEADLINE_EXCEEDED, "slow", 4,
                 "deadline exceeded before the model answered", id="deadline"),
    pytest.param(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", 8, "full", id="exhausted"),
    pytest.param(grpc.StatusCode.INTERNAL, "", 13, "INTERNAL", id="no-details"),
])
async def test_broken_stream_answers_every_item(code, details, number, message):
    fake = FakeUpstream(error=StreamBroken(code, details))
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM)
    results = await asyncio.wait_for(asyncio.gather(
        forwarder.forward([entry("a"), entry("b")]), forwarder.forward([entry("c")])), 2)
    assert fake.groups == [["a", "b", "c"]]
    flat = [r for parcel in results for r in parcel]
    assert [(r.code, r.message) for r in flat] == [(number, message)] * 3


@pytest.mark.parametrize("extra", [-1, 1], ids=["too-few", "too-many"])
async def test_wrong_result_count_fails_every_waiter(extra):
    fake = FakeUpstream(extra=extra)
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM)
    outcomes = await asyncio.wait_for(asyncio.gather(
        forwarder.forward([entry("a")]), forwarder.forward([entry("b"), entry("c")]),
        return_exceptions=True), 2)
    assert fake.groups == [["a", "b", "c"]]
    assert [type(o) for o in outcomes] == [ValueError, ValueError]
    # The forwarder recovers: the next call goes out and is answered.
    fake.extra = 0
    assert ids_of(await asyncio.wait_for(forwarder.forward([entry("d")]), 2)) == ["d"]


async def test_other_exception_reaches_every_waiter():
    boom = RuntimeError("boom")
    fake = FakeUpstream(error=boom)
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM)
    outcomes = await asyncio.wait_for(asyncio.gather(
        forwarder.forward([entry("a")]), forwarder.forward([entry("b")]),
        return_exceptions=True), 2)
    assert outcomes == [boom, boom]


# --- result <-> error -------------------------------------------------------------------

@pytest.mark.parametrize("code, message, cls", [
    (3, "why", errors.InvalidArgument),
    (4, "why", errors.DeadlineExceeded),
    (5, "why", errors.NotFound),
    (8, "why; retry after 0.05 s", errors.ResourceExhausted),  # capacity: has a retry hint
    (8, "why", errors.OverLimit),  # a limit: none
    (9, "why", errors.FailedPrecondition),
    (13, "why", errors.Internal),
    (14, "why", errors.Unavailable),
    (12, "why", errors.Unimplemented),
])
def test_raise_for_raises_the_domain_error(code, message, cls):
    with pytest.raises(cls) as caught:
        raise_for(ItemResult(code=code, message=message))
    assert type(caught.value) is cls
    assert caught.value.message == message


@pytest.mark.parametrize("code, name", [(2, "UNKNOWN"), (99, "UNKNOWN")])
def test_raise_for_unmapped_code_raises_serving_error(code, name):
    with pytest.raises(errors.ServingError) as caught:
        raise_for(ItemResult(code=code, message="m"))
    assert type(caught.value) is errors.ServingError
    assert caught.value.code == name


def test_raise_for_ok_does_nothing():
    assert raise_for(ItemResult(code=0, response=ModelInferResponse(id="x"))) is None


@pytest.mark.parametrize("error, code", [
    (errors.InvalidArgument("bad"), 3),
    (errors.DeadlineExceeded("bad"), 4),
    (errors.NotFound("bad"), 5),
    (errors.Unavailable("bad"), 14),
    (errors.Internal("bad"), 13),
])
def test_error_result(error, code):
    assert error_result(error) == ItemResult(code=code, message="bad")


async def test_an_upstream_that_never_answers_in_time_is_a_deadline():
    fake = FakeUpstream(error=TimeoutError())
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM)
    [result] = await asyncio.wait_for(forwarder.forward([entry("a")]), 2)
    assert (result.code, result.message) == (4, "deadline exceeded before the model answered")


# --- early answers and saturation -------------------------------------------------------

class EarlyUpstream:
    """Answers the items named in `refuse` early with RESOURCE_EXHAUSTED (with
    `answer_first`, the first item early with its response, as a finished batch; with
    `taken_at_once`, an early answer without results, as a batcher whose compute took the
    whole group), the rest once the call's gate (one per call, in order) is set."""

    def __init__(self, refuse: set[str], answer_first: bool = False,
                 taken_at_once: bool = False) -> None:
        self.refuse = refuse
        self.answer_first = answer_first
        self.taken_at_once = taken_at_once
        self.groups: list[list[str]] = []
        self.gates = [asyncio.Event(), asyncio.Event(), asyncio.Event()]
        self.calls = asyncio.Queue()

    async def call(self, body, timeout, early=None):
        ids = [item.request_id for item in InferGroup.FromString(b"".join(body)).items]
        gate = self.gates[len(self.groups)]
        self.groups.append(ids)
        refused = [i for i, rid in enumerate(ids) if rid in self.refuse]
        if self.taken_at_once and early is not None:
            early(InferGroupResult())
        if refused and early is not None:
            early(InferGroupResult(items=refused, results=[FULL] * len(refused)))
        if self.answer_first and len(ids) > 1 and early is not None:
            early(InferGroupResult(items=[0], results=[
                ItemResult(response=ModelInferResponse(id=ids[0], model_name="mlp"))]))
            refused.append(0)
        self.calls.put_nowait(ids)
        await gate.wait()
        rest = [i for i in range(len(ids)) if i not in refused]
        return InferGroupResult(items=rest, results=[
            ItemResult(response=ModelInferResponse(id=ids[i], model_name="mlp")) for i in rest])


FULL = ItemResult(code=8, message="queue of model 'mlp' version '1' is full; retry after 0.05 s")


async def test_an_early_refusal_answers_its_request_at_once_and_saturates_until_the_rest():
    fake = EarlyUpstream(refuse={"b"})
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM)
    first = asyncio.create_task(forwarder.forward([entry("a")]))
    assert await asyncio.wait_for(fake.calls.get(), 2) == ["a"]
    second = asyncio.create_task(forwarder.forward([entry("b")]))
    third = asyncio.create_task(forwarder.forward([entry("c")]))
    await settle()
    fake.gates[0].set()
    assert ids_of(await asyncio.wait_for(first, 2)) == ["a"]
    assert await asyncio.wait_for(fake.calls.get(), 2) == ["b", "c"]  # "b" refused early
    assert [r.code for r in await asyncio.wait_for(second, 2)] == [8]
    assert not third.done()
    # Saturated: an arrival is refused at once, without being sent.
    assert await asyncio.wait_for(forwarder.forward([entry("d")]), 2) == [FULL]
    assert len(fake.groups) == 2
    fake.gates[1].set()
    assert ids_of(await asyncio.wait_for(third, 2)) == ["c"]
    assert forwarder.saturated is None
    fake.gates[2].set()
    assert ids_of(await asyncio.wait_for(forwarder.forward([entry("e")]), 2)) == ["e"]


async def test_a_group_taken_whole_early_is_not_expected_back_until_answered():
    """An early answer without results (compute took the whole group) lets none of its
    callers go: the next group does not linger for them."""
    fake = EarlyUpstream(refuse=set(), taken_at_once=True)
    now = [0.0]
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM, linger=5.0, clock=lambda: now[0])
    first = asyncio.create_task(forwarder.forward([entry("a")]))
    assert await asyncio.wait_for(fake.calls.get(), 2) == ["a"]
    now[0] = 10.0  # a round trip of 10 s, within which a next group may linger
    fake.gates[0].set()
    await asyncio.wait_for(first, 2)
    big = [asyncio.create_task(forwarder.forward([entry(f"g{i}")])) for i in range(10)]
    assert len(await asyncio.wait_for(fake.calls.get(), 2)) == 10
    late = asyncio.create_task(forwarder.forward([entry("c")]))
    assert await asyncio.wait_for(fake.calls.get(), 2) == ["c"]  # at once, not after 5 s
    fake.gates[1].set()
    fake.gates[2].set()
    await asyncio.wait_for(asyncio.gather(*big, late), 2)


@pytest.mark.parametrize("early", [{"answer_first": True}, {"taken_at_once": True}],
                         ids=["a batch finished first", "compute took the whole group"])
async def test_a_group_answered_early_lets_the_next_group_leave(early):
    """A batch of the group finished first (an early answer with results), or the batcher
    sent the group's last request to a compute replica with room for no more (an early
    answer without results): what waits leaves as the next group at once, and the first
    group's last answer answers the rest."""
    fake = EarlyUpstream(refuse=set(), **early)
    forwarder = GroupForwarder(fake.call, "mlp", UPSTREAM)
    first = asyncio.create_task(forwarder.forward([entry("a"), entry("b")]))
    assert await asyncio.wait_for(fake.calls.get(), 2) == ["a", "b"]
    second = asyncio.create_task(forwarder.forward([entry("c")]))
    assert await asyncio.wait_for(fake.calls.get(), 2) == ["c"]  # group 1 not done yet
    await settle()
    assert not first.done() and not second.done() and forwarder.saturated is None
    fake.gates[0].set()
    assert ids_of(await asyncio.wait_for(first, 2)) == ["a", "b"]
    fake.gates[1].set()
    assert ids_of(await asyncio.wait_for(second, 2)) == ["c"]
