"""Backup and restore of a control plane whose store is PostgreSQL (a throwaway server,
tests/postgres.py): the dump is one REPEATABLE READ snapshot through psycopg, the restore
refills the tables with their keys and moves the identity column past them."""

from pathlib import Path

import pytest

from meshserve.mesh.policy import TrafficPolicy
from meshserve.mesh.store import TABLES, Store
from meshserve.tools.backup import Layout, create_backup
from meshserve.tools.restore import restore_backup
from tests.unit.test_backup import ARTIFACT, make_mesh, signing_key, trusted
from tests.unit.test_store import FakeClock

pytest_plugins = ["tests.postgres"]


def copy_state(source: Path, url: str) -> None:
    """The SQLite store of `make_mesh` moved into PostgreSQL (through a backup, as a migration
    would)."""
    with Store.open(source) as sqlite, Store.open(url, clock=FakeClock()) as postgres:
        postgres.import_tables(sqlite.export_tables())


@pytest.fixture
def mesh(tmp_path: Path, fresh_postgres_url: str) -> tuple[Path, str]:
    data = tmp_path / "mesh"
    make_mesh(data)
    copy_state(data / "mesh.db", fresh_postgres_url)
    (data / "mesh.db").unlink()
    return data, fresh_postgres_url


def test_a_postgresql_store_round_trips(mesh, tmp_path: Path,
                                        another_postgres_url: str) -> None:
    target_url = another_postgres_url
    data, source_url = mesh
    result = create_backup(Layout.of(data, store=source_url), tmp_path, signing_key(data),
                           actor="ops")
    assert result.manifest["store"]["rows"]["policy_history"] == 4
    restored = restore_backup(result.path, Layout.of(tmp_path / "restored", store=target_url),
                              trusted(data), actor="ops")
    assert restored.ok, restored.problems
    with Store.open(source_url) as live, Store.open(target_url) as store:
        before, after = live.export_tables(), store.export_tables()
        for table in TABLES:
            if table != "audit_log":
                assert after[table] == before[table], table
        seq = result.point.audit_seq
        assert store.audit()[:seq] == live.audit()[:seq]
        assert store.audit()[-1].action == "backup.restore"
        # New rows get new keys: the identity column was moved past the restored ones.
        store.put_policy(TrafficPolicy("tiny", {"2": 100}), actor="alice")
        store.rollback("tiny", actor="alice")
        assert store.policy("tiny") == TrafficPolicy("tiny", {"1": 90, "2": 10})
        assert store.verify_audit(anchor=result.point.audit_head) == []
    assert (tmp_path / "restored" / "registry").is_dir()
    assert any(path.read_bytes() == ARTIFACT
               for path in (tmp_path / "restored" / "models").rglob("model.pt"))


def test_a_restore_into_a_postgresql_store_that_holds_state_is_refused(
        mesh, tmp_path: Path) -> None:
    data, url = mesh
    result = create_backup(Layout.of(data, store=url), tmp_path, signing_key(data))
    with pytest.raises(Exception, match="already holds state: restore into an empty store"):
        restore_backup(result.path, Layout.of(tmp_path / "restored", store=url), trusted(data))
    assert not (tmp_path / "restored" / "models").exists()
