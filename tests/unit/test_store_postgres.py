"""The store on PostgreSQL: the backend-neutral tests of test_store.py, run again here on a
throwaway server (tests/postgres.py), and what only PostgreSQL has: several connections
(control planes) writing at once, the writers' lock, a dropped connection, URL handling."""

import threading

import psycopg
import pytest

from meshserve.common.errors import FailedPrecondition, InvalidArgument
from meshserve.mesh.policy import TrafficPolicy
from meshserve.mesh.store import Store
from tests.polling import until_sync

# Imported so that pytest collects them here too, where `store` is the fixture below: the
# same assertions, on PostgreSQL.
from tests.unit.test_store import (  # noqa: F401
    BERT,
    E1,
    E2,
    P1,
    P1_KEPT,
    P2,
    P3,
    FakeClock,
    filled,
    test_append_audit_and_paging,
    test_audit_limit_zero_returns_nothing,
    test_bad_endpoint_address_is_rejected,
    test_canary_records,
    test_concurrent_writers_keep_the_chain_intact,
    test_endpoints_upsert_and_remove,
    test_model_versions_are_recorded_and_audited,
    test_put_after_rollback_continues_from_the_restored_policy,
    test_put_and_get_policies,
    test_put_policy_is_audited_with_before_and_after,
    test_rollback_walks_back_through_history,
    test_rollback_with_no_history_fails_clearly,
    test_state,
    three_policies,
)

pytest_plugins = ["tests.postgres"]


@pytest.fixture
def url(fresh_postgres_url: str) -> str:
    return fresh_postgres_url


@pytest.fixture
def store(url: str):
    with Store.open(url, clock=FakeClock()) as opened:
        yield opened


def raw(url: str, sql: str) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


def test_reopen_serves_the_same_state(url: str) -> None:
    before = filled(url)

    for spelling in (url.replace("postgresql://", "postgres://"),
                     url.replace("postgresql://", "postgresql+psycopg://")):
        with Store.open(spelling) as reopened:
            assert (reopened.state(), reopened.canaries(), reopened.audit()) == before
            assert reopened.previous_policy("resnet") == P1
            assert reopened.verify_audit() == []

    with Store.open(url) as reopened:
        entry = reopened.append_audit("alice", "restart", "control-plane")
        assert entry.seq == len(before[2]) + 1 and entry.prev_hash == before[2][-1].hash
        assert reopened.rollback("resnet", actor="alice") == P1_KEPT
        assert reopened.verify_audit() == []


def test_edited_audit_row_is_detected(url: str) -> None:
    anchor = three_policies(url)

    raw(url, "UPDATE audit_log SET actor = 'mallory' WHERE seq = 2")
    with Store.open(url) as store:
        assert store.verify_audit() == ["entry 2 was altered"]

    raw(url, "DELETE FROM audit_log WHERE seq = 3")
    with Store.open(url) as store:
        assert store.verify_audit() == ["entry 2 was altered"]
        problems = store.verify_audit(anchor=anchor)
        assert problems[0] == "entry 2 was altered" and "anchored entry" in problems[1]

    raw(url, "DELETE FROM audit_log WHERE seq = 1")
    with Store.open(url) as store:
        assert store.verify_audit() == ["entry 2 was altered", "entry 1 is missing"]


def test_two_control_planes_do_not_fork_the_chain(url: str) -> None:
    """Two stores on one database (two connections, as two control planes have) write at
    once: the writers' lock orders their appends, so the chain stays one line."""
    planes = [Store.open(url), Store.open(url)]
    errors: list[BaseException] = []

    def work(store: Store, n: int) -> None:
        try:
            for i in range(15):
                store.append_audit(f"plane{n}", "x", str(i))
                share = 15 * n + i  # every policy differs: none is skipped as unchanged
                store.put_policy(TrafficPolicy("resnet", {"1": 100 - share, "2": share}),
                                 actor=f"plane{n}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(planes[n % 2], n)) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        entries = planes[0].audit()
        assert [e.seq for e in entries] == list(range(1, 121))
        assert planes[1].verify_audit() == []
        # The history is one line too: 60 policy rows, each the parent of the next.
        history = raw(url, "SELECT id, parent_id FROM policy_history ORDER BY id")
        assert len(history) == 60
        assert all(parent == previous for (_, parent), (previous, _) in
                   zip(history[1:], history[:-1]))
    finally:
        for plane in planes:
            plane.close()


def test_writers_wait_for_the_lock_and_readers_do_not(url: str, store: Store) -> None:
    store.append_audit("op", "x", "first")
    other = psycopg.connect(url)  # another control plane, in the middle of a write
    other.execute("LOCK TABLE audit_log IN SHARE ROW EXCLUSIVE MODE")
    done = threading.Event()
    writer = threading.Thread(target=lambda: (store.append_audit("op", "x", "second"),
                                              done.set()))
    try:
        writer.start()
        until_sync(lambda: raw(url, "SELECT count(*) FROM pg_locks WHERE NOT granted AND "
                                    "relation = 'audit_log'::regclass") == [(1,)],
                   10, "the writer waiting for the audit log's lock", interval=0.01)
        assert not done.is_set()
        with Store.open(url) as reader:
            assert [e.subject for e in reader.audit()] == ["first"]
    finally:
        other.rollback()
        other.close()
        writer.join(timeout=10)
    assert done.is_set()
    assert [e.subject for e in store.audit()] == ["first", "second"]


def test_control_planes_starting_together_create_the_schema_once(url: str) -> None:
    opened: list[Store] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            opened.append(Store.open(url))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for store in opened:
        store.close()
    assert errors == [] and len(opened) == 4
    assert raw(url, "SELECT version FROM schema_version") == [(1,)]


def test_schema(url: str, store: Store) -> None:
    tables = {row[0] for row in raw(url, "SELECT table_name FROM information_schema.tables "
                                         "WHERE table_schema = current_schema()")}
    assert tables == {"policy_history", "current_policy", "endpoints", "canaries",
                      "audit_log", "schema_version", "model_versions"}
    identity = raw(url, "SELECT is_identity, identity_generation, data_type FROM "
                        "information_schema.columns WHERE table_schema = current_schema() "
                        "AND table_name = 'policy_history' AND column_name = 'id'")
    assert identity == [("YES", "ALWAYS", "bigint")]
    store.close()
    raw(url, "UPDATE schema_version SET version = 99")
    with pytest.raises(FailedPrecondition, match="newer meshserve"):
        Store.open(url)


def test_a_dropped_connection_is_reopened(url: str, store: Store) -> None:
    store.put_policy(P1, actor="alice")
    raw(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
             "WHERE application_name = 'meshserve' AND pid <> pg_backend_pid()")
    # The call that finds the connection gone fails (a write is not retried: its COMMIT
    # may have landed); the next one reconnects.
    with pytest.raises(psycopg.OperationalError):
        store.policy("resnet")
    assert store.policy("resnet") == P1
    store.put_policy(P2, actor="alice")
    assert store.verify_audit() == []


def test_repr_and_messages_do_not_show_the_password(url: str, store: Store) -> None:
    with_password = url.replace("postgres@", "postgres:s3cret@")  # trust auth ignores it
    with Store.open(with_password) as opened:
        assert repr(opened) == repr(store)
        assert repr(opened).startswith("Store(postgresql:postgresql://postgres@127.0.0.1:")
        assert "s3cret" not in repr(opened)
    opened_closed = Store.open(with_password)
    opened_closed.close()
    with pytest.raises(FailedPrecondition, match="closed") as caught:
        opened_closed.policies()
    assert "s3cret" not in str(caught.value)

    missing = with_password.rsplit("/", 1)[0] + "/no_such_db"
    with pytest.raises(FailedPrecondition, match='database "no_such_db" does not exist') \
            as caught:
        Store.open(missing)
    assert "s3cret" not in str(caught.value) and caught.value.__cause__ is None

    for bad in ("postgresql://postgres:s3cret@[::1/db",
                "postgresql://postgres:s3cret@127.0.0.1:1/db?nonsense=1"):
        with pytest.raises(InvalidArgument, match="not valid") as caught:
            Store.open(bad)
        assert "s3cret" not in str(caught.value) and caught.value.__cause__ is None
