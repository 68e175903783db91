"""The asynchronous request store and the worker pool's logic, on real SQLite files."""

import asyncio
import contextlib
import itertools
import sqlite3
import time

import pytest

from meshserve.common.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from meshserve.common.metrics import PROTOCOL
from meshserve.ingress.async_service import AsyncRequests, backoff, may_see, to_proto
from meshserve.ingress.submissions import (
    CANCELLED,
    DONE,
    FAILED,
    PENDING,
    RUNNING,
    Submission,
    SubmissionStore,
    connect,
)
from meshserve.protocol.async_inference_pb2 import ResultResponse
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest, ModelInferResponse


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def store_at(path, clock, max_pending=100) -> SubmissionStore:
    ids = (f"id-{n}" for n in itertools.count())
    return SubmissionStore(connect(path), max_pending, clock=clock, new_id=lambda: next(ids))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    return store_at(tmp_path / "async.db", clock)


@pytest.fixture
def live_store(tmp_path):
    """On the wall clock, as the worker pool runs (retries become due by themselves)."""
    return store_at(tmp_path / "live.db", time.time)


def test_submit_then_claim_in_order_and_only_what_is_asked(store):
    ids = [store.submit("m", bytes([n])) for n in range(5)]
    claimed = store.claim(3)
    assert [s.id for s in claimed] == ids[:3]
    assert [s.state for s in claimed] == [RUNNING] * 3 and claimed[0].attempts == 1
    assert [s.id for s in store.claim(10)] == ids[3:]
    assert store.claim(10) == [] and store.claim(0) == []
    assert store.get(ids[0]).state == RUNNING and store.get(ids[0]).request == b"\x00"


def test_finish_and_fail_end_a_row_and_free_its_place(store):
    a, b = store.submit("m", b"a"), store.submit("m", b"b")
    store.claim(2)
    assert store.unfinished == 2
    store.finish(a, b"response")
    store.fail(b, 3, "bad input")
    assert (store.get(a).state, store.get(a).response) == (DONE, b"response")
    assert (store.get(b).state, store.get(b).code, store.get(b).message) == (FAILED, 3, "bad input")
    assert store.unfinished == 0
    store.finish(a, b"again")  # a finished row never changes again
    assert store.get(a).response == b"response" and store.unfinished == 0


def test_cancel_ends_a_pending_or_running_row_and_no_later_end_changes_it(store, clock):
    done = store.submit("m", b"d")
    store.claim(1)
    store.finish(done, b"answer")
    running = store.submit("m", b"r")
    store.claim(1)
    pending, other = store.submit("m", b"p"), store.submit("m", b"o")
    assert store.unfinished == 3
    clock.now += 1
    assert store.cancel(pending) and store.cancel(running)
    assert [store.get(i).state for i in (pending, running)] == [CANCELLED, CANCELLED]
    assert (store.get(pending).request, store.get(pending).updated) == (b"", clock.now)
    assert store.get(pending).finished and store.unfinished == 1
    store.finish(running, b"late")  # the cancelled run's own end, later, changes nothing
    store.fail(running, 3, "late")
    assert (store.get(running).state, store.get(running).response) == (CANCELLED, None)
    assert not store.cancel(done) and not store.cancel(running) and not store.cancel("nope")
    assert (store.get(done).state, store.get(done).response) == (DONE, b"answer")
    assert [s.id for s in store.claim(10)] == [other] and store.unfinished == 1
    clock.now += 100
    assert store.purge(retention=50) == 3  # the finished rows, cancelled ones too


def test_a_full_store_refuses_with_resource_exhausted(tmp_path, clock):
    store = store_at(tmp_path / "a.db", clock, max_pending=2)
    store.submit("m", b"1")
    store.submit("m", b"2")
    with pytest.raises(ResourceExhausted, match=r"holds 2 unfinished requests "
                                                r"\(--async-max-pending 2\)"):
        store.submit("m", b"3")
    [first, _] = store.claim(2)
    store.finish(first.id, b"")
    store.submit("m", b"3")  # room again


def test_retry_waits_for_its_delay_and_keeps_order(store, clock):
    a, b = store.submit("m", b"a"), store.submit("m", b"b")
    store.claim(1)
    store.retry(a, delay=2.0, code=8, message="queue full")
    assert [s.id for s in store.claim(5)] == [b]  # a is not due yet
    assert store.next_due() == clock.now + 2.0
    clock.now += 2.0
    [again] = store.claim(5)
    assert (again.id, again.attempts) == (a, 2)


def test_reopening_recovers_running_rows_and_keeps_everything(tmp_path, clock):
    store = store_at(tmp_path / "a.db", clock)
    ids = [store.submit("m", bytes([n])) for n in range(4)]
    store.claim(2)
    store.finish(ids[0], b"r")
    reopened = store_at(tmp_path / "a.db", clock)  # as after kill -9: same file
    assert reopened.unfinished == 3
    assert reopened.recover() == 1
    assert [s.id for s in reopened.claim(10)] == ids[1:]
    assert reopened.get(ids[0]).response == b"r"


def test_each_row_keeps_the_protocol_it_arrived_by(store):
    by_http, by_grpc = store.submit("m", b"h", "http"), store.submit("m", b"g")
    assert [(s.id, s.protocol) for s in store.claim(5)] == [(by_http, "http"),
                                                            (by_grpc, "grpc")]
    store.finish(by_http, b"r")
    assert store.get(by_http).protocol == "http" and store.get(by_grpc).protocol == "grpc"


# The table as stores written before rows kept their protocol have it.
OLD_SCHEMA = """
CREATE TABLE submissions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, model TEXT NOT NULL,
    request BLOB NOT NULL, state TEXT NOT NULL, response BLOB,
    code INTEGER NOT NULL DEFAULT 0, message TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0, not_before REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE INDEX submissions_by_state ON submissions (state, seq);
INSERT INTO submissions (id, model, request, state, created, updated)
    VALUES ('old-pending', 'm', x'01', 'PENDING', 1, 1),
           ('old-running', 'm', x'02', 'RUNNING', 1, 1);
INSERT INTO submissions (id, model, request, state, response, created, updated)
    VALUES ('old-done', 'm', x'', 'DONE', x'0a', 1, 1);
"""


def test_a_store_written_before_protocols_reads_as_grpc_and_takes_new_rows(tmp_path, clock):
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.executescript(OLD_SCHEMA)
    store = store_at(path, clock)
    assert store.unfinished == 2 and store.recover() == 1
    assert store.get("old-done").protocol == "grpc" and store.get("old-done").response == b"\n"
    new = store.submit("m", b"3", "http")
    assert [(s.id, s.protocol) for s in store.claim(5)] == [
        ("old-pending", "grpc"), ("old-running", "grpc"), (new, "http")]
    again = store_at(path, clock)  # opening it again changes nothing
    assert again.get(new).protocol == "http" and again.get("old-pending").protocol == "grpc"


def test_each_row_keeps_its_owner_and_rows_without_one_have_none(store):
    by_alice, nobodys = store.submit("m", b"a", owner="app/alice"), store.submit("m", b"n")
    assert [(s.id, s.owner) for s in store.claim(5)] == [(by_alice, "app/alice"),
                                                         (nobodys, None)]
    store.finish(by_alice, b"r")
    assert store.get(by_alice).owner == "app/alice" and store.get(nobodys).owner is None


# The table as the previous version wrote it: protocols kept, owners not.
PREVIOUS_SCHEMA = """
CREATE TABLE submissions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, model TEXT NOT NULL,
    request BLOB NOT NULL, state TEXT NOT NULL, response BLOB,
    code INTEGER NOT NULL DEFAULT 0, message TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0, not_before REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL, updated REAL NOT NULL,
    protocol TEXT NOT NULL DEFAULT 'grpc');
CREATE INDEX submissions_by_state ON submissions (state, seq);
INSERT INTO submissions (id, model, request, state, created, updated, protocol)
    VALUES ('old-pending', 'm', x'01', 'PENDING', 1, 1, 'http');
INSERT INTO submissions (id, model, request, state, response, created, updated)
    VALUES ('old-done', 'm', x'', 'DONE', x'0a', 1, 1);
"""


def test_a_store_written_before_owners_has_rows_without_one_and_takes_owned_rows(
        tmp_path, clock):
    path = tmp_path / "previous.db"
    with contextlib.closing(sqlite3.connect(path)) as previous:
        previous.executescript(PREVIOUS_SCHEMA)
    store = store_at(path, clock)
    assert store.unfinished == 1
    assert (store.get("old-done").owner, store.get("old-done").response) == (None, b"\n")
    new = store.submit("m", b"3", owner="app/bob")
    assert [(s.id, s.protocol, s.owner) for s in store.claim(5)] == [
        ("old-pending", "http", None), (new, "grpc", "app/bob")]
    again = store_at(path, clock)  # opening it again changes nothing
    assert again.get(new).owner == "app/bob" and again.get("old-pending").owner is None


def test_purge_deletes_only_finished_rows_past_retention(store, clock):
    old, young, waiting = (store.submit("m", b"x") for _ in range(3))
    store.claim(2)
    store.finish(old, b"")
    clock.now += 100
    store.finish(young, b"")
    clock.now += 50
    assert store.purge(retention=120) == 1
    assert store.get(old) is None
    assert store.get(young) is not None and store.get(waiting).state == PENDING


@pytest.mark.parametrize("attempts, seconds", [(0, 0.05), (1, 0.05), (2, 0.1), (3, 0.2),
                                               (6, 1.6), (7, 2.0), (50, 2.0)])
def test_backoff_doubles_up_to_a_cap(attempts, seconds):
    assert backoff(attempts) == pytest.approx(seconds)


def request(model="m", value=1) -> ModelInferRequest:
    r = ModelInferRequest(model_name=model, id=f"r{value}")
    r.raw_input_contents.append(bytes([value]))
    return r


class Mesh:
    """Answers with the input byte doubled; refuses each request's first `refuse` tries."""

    def __init__(self, refuse: int = 0) -> None:
        self.refuse = refuse
        self.tries: dict[str, int] = {}
        self.calls = 0
        self.in_flight = 0
        self.most = 0

    async def __call__(self, r: ModelInferRequest) -> ModelInferResponse:
        self.calls += 1
        self.tries[r.id] = self.tries.get(r.id, 0) + 1
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            if self.tries[r.id] <= self.refuse:
                raise Unavailable("router unavailable")
            if r.model_name == "bad":
                raise InvalidArgument("input 'x' has shape [2]")
            response = ModelInferResponse(model_name=r.model_name, id=r.id)
            response.raw_output_contents.append(bytes([r.raw_input_contents[0][0] * 2]))
            return response
        finally:
            self.in_flight -= 1


def check(r: ModelInferRequest) -> None:
    if r.model_name == "nope":
        raise NotFound("unknown model 'nope'")


async def run_until_done(requests: AsyncRequests, ids: list[str]) -> list:
    worker = asyncio.create_task(requests.run())
    try:
        return [await asyncio.wait_for(requests.wait(i, 5.0), 10) for i in ids]
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)


async def test_workers_answer_everything_with_bounded_concurrency(live_store):
    mesh = Mesh()
    requests = AsyncRequests(live_store, mesh, check, concurrency=4, retention_seconds=60,
                             retry_seconds=60)
    ids = [requests.submit(request(value=n)) for n in range(40)]
    done = await run_until_done(requests, ids)
    assert [s.state for s in done] == [DONE] * 40
    assert [to_proto(s).response.raw_output_contents[0][0] for s in done] == [
        2 * n for n in range(40)]
    assert mesh.most == 4 and mesh.calls == 40


async def test_workers_serve_each_request_under_the_protocol_it_arrived_by(live_store):
    """What the ingress's metrics read (PROTOCOL) while each request is in the mesh, retried
    ones included; the worker pool itself runs as gRPC's default."""
    seen: dict[str, list[str]] = {}
    mesh = Mesh(refuse=1)

    async def infer(r: ModelInferRequest) -> ModelInferResponse:
        seen.setdefault(r.id, []).append(PROTOCOL.get())
        return await mesh(r)

    requests = AsyncRequests(live_store, infer, check, concurrency=2, retention_seconds=60,
                             retry_seconds=60)
    token = PROTOCOL.set("http")  # as the HTTP front door sets it for the task serving it
    try:
        by_http = requests.submit(request(value=1), PROTOCOL.get())
    finally:
        PROTOCOL.reset(token)
    by_grpc = requests.submit(request(value=2))
    done = await run_until_done(requests, [by_http, by_grpc])
    assert [s.state for s in done] == [DONE, DONE]
    assert seen == {"r1": ["http", "http"], "r2": ["grpc", "grpc"]}
    assert PROTOCOL.get() == "grpc"


async def test_refusals_are_retried_and_other_errors_fail(live_store):
    mesh = Mesh(refuse=3)
    requests = AsyncRequests(live_store, mesh, check, concurrency=1, retention_seconds=60,
                             retry_seconds=60)
    ok, bad = requests.submit(request(value=5)), requests.submit(request(model="bad", value=6))
    [done, failed] = await run_until_done(requests, [ok, bad])
    assert (done.state, done.attempts) == (DONE, 4)
    assert to_proto(done).response.raw_output_contents == [bytes([10])]
    answer = to_proto(failed)
    assert (answer.state, answer.code, answer.message) == (
        ResultResponse.FAILED, 3, "input 'x' has shape [2]")


async def test_refusals_past_the_retry_window_fail(live_store):
    mesh = Mesh(refuse=100)
    requests = AsyncRequests(live_store, mesh, check, concurrency=1, retention_seconds=60,
                             retry_seconds=0)
    [failed] = await run_until_done(requests, [requests.submit(request())])
    assert (failed.state, failed.code, failed.message) == (FAILED, 14, "router unavailable")


async def test_submit_checks_first_and_unknown_ids_are_not_found(live_store):
    requests = AsyncRequests(live_store, Mesh(), check, 1, 60, 60)
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        requests.submit(request(model="nope"))
    assert live_store.unfinished == 0
    with pytest.raises(NotFound, match="no asynchronous request 'missing'"):
        await requests.wait("missing", 0)
    with pytest.raises(InvalidArgument, match="id is empty"):
        requests.lookup("")
    pending = await requests.wait(requests.submit(request()), 0.01)  # no worker: still PENDING
    assert to_proto(pending).state == ResultResponse.PENDING


def row(owner: str | None, model: str = "m") -> Submission:
    return Submission("id", model, b"", DONE, b"", 0, "", 1, 1.0, 1.0, owner=owner)


@pytest.mark.parametrize("owner, principals, operated, seen", [
    ("app/alice", {"app/alice"}, set(), True),              # its owner
    ("app/alice", {"client/gw", "app/alice"}, set(), True),  # owner among what was proved
    ("app/alice", {"app/bob"}, set(), False),                # another principal
    ("app/alice", set(), set(), False),                      # an anonymous caller
    ("app/alice", {"app/alice*"}, set(), False),             # names are not globs
    ("app/alice", {"client/developer"}, {"m"}, True),        # an operator of its model
    ("app/alice", {"client/developer"}, {"other"}, False),   # an operator of another model
    (None, {"app/bob"}, set(), True),                        # no owner: the id is the key
    (None, set(), set(), True),
])
def test_who_sees_a_stored_request(owner, principals, operated, seen):
    asked: list[str] = []

    def operates(model: str) -> bool:
        asked.append(model)
        return model in operated

    assert may_see(row(owner), principals, operates) is seen
    assert asked == ([] if owner is None or owner in principals else ["m"])


async def test_a_request_not_the_callers_answers_as_an_unknown_id(live_store):
    requests = AsyncRequests(live_store, Mesh(), check, 1, 60, 60)
    alices = requests.submit(request(), owner="app/alice")
    assert live_store.get(alices).owner == "app/alice"

    def seen_by(principal: str):
        return lambda found: may_see(found, {principal}, lambda model: False)

    assert requests.lookup(alices, seen_by("app/alice")).id == alices
    assert (await requests.wait(alices, 0.01, seen_by("app/alice"))).state == PENDING
    with pytest.raises(NotFound) as unknown:
        requests.lookup("f" * 32, seen_by("app/bob"))
    with pytest.raises(NotFound) as hidden:
        requests.lookup(alices, seen_by("app/bob"))
    with pytest.raises(NotFound) as hidden_wait:
        await requests.wait(alices, 5.0, seen_by("app/bob"))
    shape = str(unknown.value).replace("f" * 32, alices)
    assert str(hidden.value) == str(hidden_wait.value) == shape
    with pytest.raises(NotFound) as hidden_cancel:
        requests.cancel(alices, seen_by("app/bob"))
    assert str(hidden_cancel.value) == shape
    assert live_store.get(alices).state == PENDING  # not given up by a caller who sees it not


class Held:
    """A mesh whose calls wait until `release` is set; `given_up` counts those cancelled."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started: list[str] = []
        self.given_up: list[str] = []

    async def __call__(self, r: ModelInferRequest) -> ModelInferResponse:
        self.started.append(r.id)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.given_up.append(r.id)
            raise
        return ModelInferResponse(model_name=r.model_name, id=r.id)


async def until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_cancel_gives_up_a_pending_or_running_request_and_wakes_its_waiters(live_store):
    mesh = Held()
    requests = AsyncRequests(live_store, mesh, check, concurrency=1, retention_seconds=60,
                             retry_seconds=60)
    running, pending, later = (requests.submit(request(value=n)) for n in (1, 2, 3))
    worker = asyncio.create_task(requests.run())
    try:
        await until(lambda: mesh.started == ["r1"])
        waiting = asyncio.create_task(requests.wait(running, 30.0))
        waiting_pending = asyncio.create_task(requests.wait(pending, 30.0))
        await asyncio.sleep(0.01)
        assert to_proto(requests.cancel(pending)).state == ResultResponse.CANCELLED
        assert to_proto(requests.cancel(running)).state == ResultResponse.CANCELLED
        assert (await asyncio.wait_for(waiting, 1)).state == CANCELLED
        assert (await asyncio.wait_for(waiting_pending, 1)).state == CANCELLED
        assert mesh.given_up == ["r1"]
        # The worker's place is free again, and the pending request never runs.
        await until(lambda: mesh.started == ["r1", "r3"])
        mesh.release.set()
        assert (await asyncio.wait_for(requests.wait(later, 5.0), 10)).state == DONE
        assert to_proto(requests.cancel(later)).state == ResultResponse.DONE  # finished: kept
        assert [live_store.get(i).state for i in (running, pending)] == [CANCELLED] * 2
        assert live_store.unfinished == 0
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
