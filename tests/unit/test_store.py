import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from meshserve.common.errors import FailedPrecondition, InvalidArgument, NotFound
from meshserve.mesh.audit import GENESIS
from meshserve.mesh.database import POSTGRESQL, SQLITE
from meshserve.mesh.database_urls import missing_store_file
from meshserve.mesh.policy import Endpoint, MeshState, Shadow, TrafficPolicy
from meshserve.mesh.store import Store
from meshserve.mesh.store_canaries import OVER_START, RESTORE, START
from meshserve.mesh.store_policies import PolicyChanged


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


P1 = TrafficPolicy("resnet", {"1": 100})
P2 = TrafficPolicy("resnet", {"1": 90, "2": 10})
P3 = TrafficPolicy("resnet", {"1": 50, "2": 50}, shadow=Shadow("2", 5.0), region="eu")
BERT = TrafficPolicy("bert", {"3": 100})
# P1 as a rollback restores it after P2 added version 2: a rollback never removes a version.
P1_KEPT = TrafficPolicy("resnet", {"1": 100, "2": 0})

E1 = Endpoint("resnet", "1", "10.0.0.1:8001")
E2 = Endpoint("resnet", "2", "10.0.0.2:8001", region="eu", zone="eu-1a")
E10 = Endpoint("resnet", "10", "10.0.0.3:8001")
EB = Endpoint("bert", "3", "[::1]:8001")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "mesh.db"


@pytest.fixture
def store(path: Path):
    with Store.open(path, clock=FakeClock()) as opened:
        yield opened


def test_put_and_get_policies(store: Store) -> None:
    assert store.policy("resnet") is None
    assert store.policies() == {}
    store.put_policy(P1, actor="alice", reason="first")
    store.put_policy(BERT, actor="bob")
    store.put_policy(P3, actor="alice")
    assert store.policy("resnet") == P3
    assert store.policy("bert") == BERT
    assert store.policies() == {"bert": BERT, "resnet": P3}
    assert list(store.policies()) == ["bert", "resnet"]
    assert store.previous_policy("resnet") == P1
    assert store.previous_policy("bert") is None
    assert store.previous_policy("nope") is None


def test_put_policy_is_audited_with_before_and_after(store: Store) -> None:
    store.put_policy(P1, actor="alice", reason="first")
    store.put_policy(P2, actor="bob", reason="canary 10%")
    first, second = store.audit()
    assert (first.seq, first.actor, first.action, first.subject) == (1, "alice", "policy.set",
                                                                     "resnet")
    assert (first.before, first.after, first.reason) == ("", P1.to_json(), "first")
    assert first.prev_hash == GENESIS
    assert first.at == "2026-01-01T00:00:01.000000Z"
    assert (second.before, second.after, second.reason) == (P1.to_json(), P2.to_json(),
                                                            "canary 10%")
    assert second.prev_hash == first.hash
    assert second.at == "2026-01-01T00:00:02.000000Z"


def test_rollback_walks_back_through_history(store: Store) -> None:
    """Rollback is undo: each one goes one policy further back; it is not a toggle."""
    store.put_policy(P1, actor="alice")
    store.put_policy(P2, actor="alice")
    store.put_policy(P3, actor="alice")
    assert store.rollback("resnet", actor="bob", reason="errors up") == P2
    assert store.policy("resnet") == P2
    assert store.previous_policy("resnet") == P1
    assert store.rollback("resnet", actor="bob") == P1_KEPT
    assert store.policy("resnet") == P1_KEPT
    assert store.previous_policy("resnet") is None
    with pytest.raises(FailedPrecondition, match="no earlier policy to roll back to"):
        store.rollback("resnet", actor="bob")
    assert store.policy("resnet") == P1_KEPT

    rollbacks = [e for e in store.audit() if e.action == "policy.rollback"]
    assert [(e.before, e.after, e.actor) for e in rollbacks] == [
        (P3.to_json(), P2.to_json(), "bob"), (P2.to_json(), P1_KEPT.to_json(), "bob")]
    assert rollbacks[0].reason == "errors up"
    # A failed rollback writes nothing.
    assert len(store.audit()) == 5
    assert store.verify_audit() == []


def test_put_after_rollback_continues_from_the_restored_policy(store: Store) -> None:
    store.put_policy(P1, actor="alice")
    store.put_policy(P2, actor="alice")
    store.rollback("resnet", actor="alice")
    store.put_policy(P3, actor="alice")
    assert store.previous_policy("resnet") == P1_KEPT
    assert store.rollback("resnet", actor="alice") == P1_KEPT


def test_rollback_keeps_every_version_and_the_versions_named_to_keep(store: Store) -> None:
    """A rollback restores weights, shadow and region, never a version's existence: versions
    the current policy names, or `keep` names (registered endpoints), stay at weight 0."""
    store.put_policy(P1, actor="alice")
    store.put_policy(P3, actor="alice")
    restored = store.rollback("resnet", actor="bob", keep=["10"])
    assert restored == TrafficPolicy("resnet", {"1": 100, "2": 0, "10": 0})
    assert store.policy("resnet") == restored
    [entry] = [e for e in store.audit() if e.action == "policy.rollback"]
    assert (entry.before, entry.after) == (P3.to_json(), restored.to_json())


def test_putting_the_current_policy_again_records_nothing(store: Store) -> None:
    assert store.put_policy(P1, actor="alice") is True
    assert store.put_policy(P2, actor="alice") is True
    assert store.put_policy(TrafficPolicy("resnet", {"2": 10, "1": 90}), actor="bob") is False
    assert len(store.audit()) == 2
    assert store.rollback("resnet", actor="bob") == P1_KEPT  # one undo reaches P1


def test_put_policy_with_an_expected_policy_is_refused_once_it_changed(store: Store) -> None:
    store.put_policy(P1, actor="alice")
    store.put_policy(P2, actor="alice", expected=P1)
    with pytest.raises(PolicyChanged, match="changed since it was read") as refused:
        store.put_policy(P3, actor="bob", expected=P1)
    assert refused.value.code == "ABORTED"
    assert store.policy("resnet") == P2 and len(store.audit()) == 2
    with pytest.raises(PolicyChanged):
        store.put_policy(BERT, actor="bob", expected=BERT)  # no policy yet


def test_rollback_with_no_history_fails_clearly(store: Store) -> None:
    with pytest.raises(NotFound, match="model 'resnet' has no policy"):
        store.rollback("resnet", actor="alice")
    store.put_policy(P1, actor="alice")
    with pytest.raises(FailedPrecondition,
                       match="model 'resnet' has no earlier policy to roll back to"):
        store.rollback("resnet", actor="alice")
    assert store.policy("resnet") == P1
    assert len(store.audit()) == 1


def test_endpoints_upsert_and_remove(store: Store) -> None:
    store.put_endpoint(E10, actor="batcher")
    store.put_endpoint(E2, actor="batcher")
    store.put_endpoint(E1, actor="batcher")
    store.put_endpoint(EB, actor="batcher")
    # Sorted by model, then version numerically, then address.
    assert store.endpoints() == (EB, E1, E2, E10)

    moved = Endpoint("resnet", "1", "10.0.0.1:8001", region="us", zone="us-1b")
    store.put_endpoint(moved, actor="batcher")
    assert store.endpoints() == (EB, moved, E2, E10)
    store.put_endpoint(moved, actor="batcher")  # unchanged: nothing recorded

    entries = store.audit()
    assert [e.action for e in entries] == ["endpoint.add"] * 5
    update = entries[-1]
    assert update.subject == "resnet/1/10.0.0.1:8001"
    assert '"region": "local"' in update.before and '"region": "us"' in update.after

    store.remove_endpoint("resnet", "2", "10.0.0.2:8001", actor="alice", reason="drained")
    assert store.endpoints() == (EB, moved, E10)
    removal = store.audit()[-1]
    assert (removal.action, removal.subject, removal.after, removal.reason) == (
        "endpoint.remove", "resnet/2/10.0.0.2:8001", "", "drained")
    assert '"zone": "eu-1a"' in removal.before
    with pytest.raises(NotFound, match="no endpoint of model 'resnet' version '2'"):
        store.remove_endpoint("resnet", "2", "10.0.0.2:8001", actor="alice")


@pytest.mark.parametrize("address", ["nohost", "host:", ":8001", "host:99999", "host:x"])
def test_bad_endpoint_address_is_rejected(store: Store, address: str) -> None:
    with pytest.raises(InvalidArgument, match="HOST:PORT"):
        store.put_endpoint(Endpoint("resnet", "1", address), actor="a")
    assert store.endpoints() == ()


def test_state(store: Store) -> None:
    assert store.state() == MeshState()
    store.put_policy(P2, actor="alice")
    store.put_policy(BERT, actor="alice")
    store.put_endpoint(E2, actor="alice")
    store.put_endpoint(E1, actor="alice")
    state = store.state()
    assert state == MeshState(policies={"bert": BERT, "resnet": P2}, endpoints=(E1, E2))
    assert state.endpoints_of("resnet", "2") == [E2]


def test_canary_records(store: Store) -> None:
    assert store.canary("resnet") is None
    store.put_canary("resnet", {"version": "2", "step": 0, "weights": [10, 50]}, actor="ctl",
                     action="canary.start", reason="new model")
    store.put_canary("resnet", {"version": "2", "step": 1, "weights": [10, 50]}, actor="ctl",
                     action="canary.step")
    assert store.canary("resnet") == {"version": "2", "step": 1, "weights": [10, 50]}
    assert store.canaries() == {"resnet": {"version": "2", "step": 1, "weights": [10, 50]}}
    start, step = store.audit()
    assert (start.action, start.subject, start.before, start.reason) == (
        "canary.start", "resnet", "", "new model")
    assert (step.action, step.before) == ("canary.step", start.after)
    with pytest.raises(InvalidArgument, match="not JSON"):
        store.put_canary("resnet", {"at": object()}, actor="ctl", action="canary.step")
    assert store.canary("resnet")["step"] == 1


S1 = TrafficPolicy("resnet", {"1": 80, "2": 20})
S2 = TrafficPolicy("resnet", {"1": 40, "2": 60})


@pytest.mark.parametrize(("last", "stacking", "undone"), [
    (S2, OVER_START, P2),  # promoted: undoing it restores the policy the canary began from
    (P2, RESTORE, P1_KEPT),  # rolled back: as if the canary had not run
])
def test_canary_policies_join_the_undo_stack_as_one_change(store: Store, last, stacking,
                                                           undone) -> None:
    store.put_policy(P1, actor="alice")
    store.put_policy(P2, actor="alice")
    store.put_canary("resnet", {"step": 0}, "alice", "canary.start", "go", policy=S1,
                     stacking=START)
    store.put_canary("resnet", {"step": 1}, "ctl", "canary.step", "healthy", policy=S2,
                     stacking=OVER_START)
    store.put_canary("resnet", {"step": 1, "state": "end"}, "ctl", "canary.end", "done",
                     policy=last, stacking=stacking)
    assert (store.policy("resnet"), store.canary("resnet")) == (last, {"step": 1,
                                                                       "state": "end"})
    entries = [(e.actor, e.action, e.before, e.after, e.reason) for e in store.audit()][2:]
    assert entries == [("alice", "canary.start", P2.to_json(), S1.to_json(), "go"),
                       ("ctl", "canary.step", S1.to_json(), S2.to_json(), "healthy"),
                       ("ctl", "canary.end", S2.to_json(), last.to_json(), "done")]
    assert store.rollback("resnet", "bob") == undone


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"action": "canary.step", "policy": S1, "stacking": START}, "first policy"),
    ({"action": "canary.start", "policy": S1, "stacking": OVER_START}, "first policy"),
    ({"action": "canary.step", "policy": S1}, "stacking '' is not one of start, over_start, "
                                              "restore"),
    ({"action": "canary.step", "stacking": OVER_START}, "needs a policy"),
    ({"action": "canary.step", "policy": S1, "stacking": "top"}, "is not one of"),
    ({"action": "canary.step", "policy": BERT, "stacking": OVER_START}, "model 'bert' given"),
])
def test_put_canary_refuses_a_policy_it_cannot_stack(store: Store, kwargs, message) -> None:
    store.put_policy(P1, actor="alice")
    with pytest.raises(InvalidArgument, match=message):
        store.put_canary("resnet", {"step": 0}, "ctl", **kwargs)
    assert (store.policy("resnet"), store.canary("resnet"), len(store.audit())) == (P1, None, 1)


def test_append_audit_and_paging(store: Store) -> None:
    made = [store.append_audit("op", "model.load", f"m{i}", after=str(i)) for i in range(5)]
    assert [e.seq for e in made] == [1, 2, 3, 4, 5]
    assert store.audit() == made
    assert store.audit(limit=2) == made[:2]
    assert store.audit(limit=2, after_seq=2) == made[2:4]
    assert store.audit(after_seq=5) == []
    assert store.head_hash() == made[-1].hash
    with pytest.raises(InvalidArgument):
        store.audit(limit=-1)
    with pytest.raises(InvalidArgument, match="actor"):
        store.append_audit("", "x", "y")


def filled(location: str | Path) -> tuple:
    """Open the store at `location`, put policies, endpoints and a canary, close it; what it
    then held (state, canaries, audit log)."""
    with Store.open(location, clock=FakeClock()) as store:
        store.put_policy(P1, actor="alice")
        store.put_policy(P2, actor="alice")
        store.put_policy(BERT, actor="bob")
        store.put_endpoint(E1, actor="batcher")
        store.put_endpoint(E2, actor="batcher")
        store.put_canary("resnet", {"step": 2}, actor="ctl", action="canary.step")
        return store.state(), store.canaries(), store.audit()


def test_reopen_serves_the_same_state(path: Path) -> None:
    before = filled(path)

    with Store.open(f"sqlite:///{path}") as reopened:
        assert (reopened.state(), reopened.canaries(), reopened.audit()) == before
        assert reopened.previous_policy("resnet") == P1
        assert reopened.verify_audit() == []
        # The chain continues where it stopped.
        entry = reopened.append_audit("alice", "restart", "control-plane")
        assert entry.seq == len(before[2]) + 1 and entry.prev_hash == before[2][-1].hash
        assert reopened.rollback("resnet", actor="alice") == P1_KEPT


def three_policies(location: str | Path) -> str:
    """Put P1, P2 and P3 into the store at `location`; the audit head hash after them."""
    with Store.open(location) as store:
        store.put_policy(P1, actor="alice")
        store.put_policy(P2, actor="alice")
        store.put_policy(P3, actor="alice")
        anchor = store.head_hash()
        assert store.verify_audit(anchor=anchor) == []
    return anchor


def test_edited_audit_row_in_the_file_is_detected(path: Path) -> None:
    anchor = three_policies(path)

    raw = sqlite3.connect(path)
    with raw:
        raw.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2")
    raw.close()

    with Store.open(path) as store:
        assert store.verify_audit() == ["entry 2 was altered"]

    raw = sqlite3.connect(path)
    with raw:
        raw.execute("DELETE FROM audit_log WHERE seq = 3")
    raw.close()

    with Store.open(path) as store:
        # The removed tail is only visible against an anchor exported earlier.
        assert store.verify_audit() == ["entry 2 was altered"]
        problems = store.verify_audit(anchor=anchor)
        assert problems[0] == "entry 2 was altered" and "anchored entry" in problems[1]


def test_deleted_middle_audit_row_is_detected(path: Path) -> None:
    with Store.open(path) as store:
        for i in range(4):
            store.append_audit("op", "x", str(i))
    raw = sqlite3.connect(path)
    with raw:
        raw.execute("DELETE FROM audit_log WHERE seq = 2")
    raw.close()
    with Store.open(path) as store:
        assert store.verify_audit() == ["entry 2 is missing"]


@pytest.mark.parametrize("url", ["postgresql://127.0.0.1:1/mesh",
                                 "postgres://u:secret@127.0.0.1:1/mesh",
                                 "postgresql+psycopg://u:secret@127.0.0.1:1/mesh",
                                 "postgresql://u@127.0.0.1:1/mesh?password=secret"])
def test_postgresql_urls_connect_without_echoing_the_password(url: str) -> None:
    """PostgreSQL URLs go to PostgreSQL (nothing listens on port 1 here); the error does
    not show the password. tests/unit/test_store_postgres.py runs the store on a server."""
    with pytest.raises(FailedPrecondition, match="cannot connect to the PostgreSQL store") \
            as caught:
        Store.open(url)
    assert "secret" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_other_urls(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="unsupported store URL scheme 'mysql'"):
        Store.open("mysql://db/mesh")
    with Store.open("sqlite://") as memory:
        memory.put_policy(P1, actor="a")
        assert memory.policy("resnet") == P1
    with Store.open(str(tmp_path / "plain.db")) as plain:
        assert plain.policies() == {}


def test_wal_mode_and_schema(path: Path) -> None:
    Store.open(path).close()
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"policy_history", "current_policy", "endpoints", "canaries", "audit_log",
            "schema_version"} <= tables
    raw.execute("UPDATE schema_version SET version = 99")
    raw.commit()
    raw.close()
    with pytest.raises(FailedPrecondition, match="newer meshserve"):
        Store.open(path)


def test_not_a_database(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.db"
    bogus.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(FailedPrecondition, match="cannot open the store"):
        Store.open(bogus)


def test_closed_store(path: Path) -> None:
    store = Store.open(path)
    store.close()
    store.close()
    with pytest.raises(FailedPrecondition, match="closed"):
        store.policies()


def test_concurrent_writers_keep_the_chain_intact(store: Store) -> None:
    def work(n: int) -> None:
        for i in range(25):
            store.append_audit(f"t{n}", "x", str(i))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store.audit()) == 100
    assert store.verify_audit() == []


def test_dialects() -> None:
    sql = "SELECT a FROM t WHERE b = ? AND c = ?"
    assert SQLITE.sql(sql) == sql
    assert POSTGRESQL.sql(sql) == "SELECT a FROM t WHERE b = %s AND c = %s"


def test_audit_limit_zero_returns_nothing(store: Store) -> None:
    store.append_audit("op", "x", "y")
    assert store.audit(limit=0) == []
    assert len(store.audit(limit=1)) == 1


@pytest.mark.parametrize("url", ["postgresql+asyncpg://u:secret@db/mesh",
                                 "postgresql+psycopg2://db/mesh"])
def test_other_postgresql_drivers_are_refused(url: str) -> None:
    with pytest.raises(InvalidArgument, match="unsupported store URL scheme 'postgresql\\+")\
            as caught:
        Store.open(url)
    assert "secret" not in str(caught.value)


def test_model_versions_are_recorded_and_audited(store: Store) -> None:
    assert store.model_versions() == []
    first = store.add_model_version("mlp", "10", "sha256:aa", "ed25519:k1", '{"m":1}',
                                    actor="client/developer", reason="retrained")
    store.add_model_version("mlp", "2", "sha256:bb", "ed25519:k1", "{}", actor="ci")
    store.add_model_version("cnn", "1", "sha256:cc", "ed25519:k2", "{}", actor="ci")
    assert first.pushed_at == "2026-01-01T00:00:01.000000Z"
    assert [(v.name, v.version) for v in store.model_versions()] == [
        ("cnn", "1"), ("mlp", "2"), ("mlp", "10")]
    assert store.model_versions("mlp")[-1] == first
    assert store.model_versions("nope") == []
    with pytest.raises(FailedPrecondition, match="^model 'mlp' version 2 is already in the "
                                                 "registry; versions are immutable"):
        store.add_model_version("mlp", "2", "sha256:dd", "ed25519:k1", "{}", actor="ci")
    assert store.model_versions("mlp")[0].digest == "sha256:bb"
    pushes = [e for e in store.audit() if e.action == "model.push"]
    assert [(e.actor, e.subject, e.reason) for e in pushes] == [
        ("client/developer", "mlp/10", "retrained"), ("ci", "mlp/2", ""), ("ci", "cnn/1", "")]
    assert pushes[0].after == '{"digest": "sha256:aa", "signer": "ed25519:k1"}'
    assert store.verify_audit() == []
    with pytest.raises(InvalidArgument, match="digest must be a non-empty string"):
        store.add_model_version("mlp", "3", "", "ed25519:k1", "{}", actor="ci")


def test_missing_store_file_names_only_a_sqlite_file_that_is_not_there(tmp_path) -> None:
    present = tmp_path / "mesh.db"
    present.write_bytes(b"")
    assert missing_store_file(present) is None
    assert missing_store_file(f"sqlite:///{tmp_path}/nope.db") == f"{tmp_path}/nope.db"
    assert missing_store_file(str(tmp_path / "nope.db")) == str(tmp_path / "nope.db")
    assert missing_store_file("sqlite://") is None  # in memory
    assert missing_store_file("postgresql://mesh@db.internal:5432/mesh") is None
