"""Backup and restore of a control plane whose store is PostgreSQL (a throwaway server,
tests/postgres.py): the dump is one REPEATABLE READ snapshot through psycopg, the restore
refills the tables with their keys and moves the identity column past them, and records
itself in the audit log in the same transaction: a restore that fails anywhere, the
connection dropped included, leaves the target as it was. Failures are made by the server
itself (triggers that raise or end the session), not by mocks."""

import io
import json
import socket
import tarfile
from pathlib import Path

import psycopg
import pytest

from meshserve.mesh import backup
from meshserve.mesh.policy import TrafficPolicy
from meshserve.mesh.store import TABLES, Store
from meshserve.tools import cli
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


def raw(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def row_counts(url: str) -> dict[str, int]:
    with Store.open(url) as store:
        return {table: len(rows.rows) for table, rows in store.export_tables().items()}


# Functions for the triggers below: one refuses the row, one ends its own session (as a
# server restart or a network cut would, mid-transaction).
REFUSE = ("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ "
          "BEGIN RAISE EXCEPTION 'audit_log is read-only'; END $$")
HANG_UP = ("CREATE FUNCTION hang_up() RETURNS trigger LANGUAGE plpgsql AS $$ "
           "BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NEW; END $$")
ON_RESTORE_ENTRY = "ON audit_log FOR EACH ROW WHEN (NEW.action = 'backup.restore')"


@pytest.fixture
def archive(mesh, tmp_path: Path) -> Path:
    data, url = mesh
    return create_backup(Layout.of(data, store=url), tmp_path / "backups",
                         signing_key(data)).path


@pytest.fixture
def target_url(another_postgres_url: str) -> str:
    """An empty store's schema, made beforehand so that a test can put triggers on it."""
    Store.open(another_postgres_url).close()
    return another_postgres_url


def test_a_restore_whose_audit_entry_fails_leaves_no_imported_rows(
        mesh, archive: Path, tmp_path: Path, target_url: str) -> None:
    data, _ = mesh
    raw(target_url, REFUSE, f"CREATE TRIGGER refuse BEFORE INSERT {ON_RESTORE_ENTRY} "
                            "EXECUTE FUNCTION refuse()")
    layout = Layout.of(tmp_path / "restored", store=target_url)
    with pytest.raises(Exception, match="audit_log is read-only"):
        restore_backup(archive, layout, trusted(data), actor="ops")
    assert row_counts(target_url) == dict.fromkeys(TABLES, 0)
    assert not (tmp_path / "restored").exists()

    raw(target_url, "DROP TRIGGER refuse ON audit_log")
    assert restore_backup(archive, layout, trusted(data), actor="ops").ok  # a retry
    assert row_counts(target_url)["policy_history"] == 4


def newer_archive(archive: Path, data: Path, tmp_path: Path) -> Path:
    """`archive` with a manifest that says schema version 99, signed by the trusted key."""
    newer = tmp_path / "newer.tar"
    with tarfile.open(archive) as source, tarfile.open(newer, "w") as out:
        for info in source:
            content = source.extractfile(info).read()
            if info.name == backup.MANIFEST:
                manifest = json.loads(content)
                manifest["store"]["schema_version"] = 99
                content = json.dumps(manifest).encode()
                signature = backup.sign(manifest, signing_key(data))
            if info.name != backup.SIGNATURE:
                info.size = len(content)
                out.addfile(info, io.BytesIO(content))
        info = tarfile.TarInfo(backup.SIGNATURE)
        info.size = len(signature)
        out.addfile(info, io.BytesIO(signature))
    return newer


# (what goes wrong, statements run on the target first, exit code, what the one line says)
FAILURES = {
    "the audit entry is refused": (
        [REFUSE, f"CREATE TRIGGER t BEFORE INSERT {ON_RESTORE_ENTRY} EXECUTE FUNCTION refuse()"],
        2, "audit_log is read-only; nothing was restored"),
    "the connection drops after the import": (
        [HANG_UP, f"CREATE TRIGGER t BEFORE INSERT {ON_RESTORE_ENTRY} "
                  "EXECUTE FUNCTION hang_up()"],
        2, "terminating connection due to administrator command; nothing was restored"),
    "the connection drops during the import": (
        [HANG_UP, "CREATE TRIGGER t BEFORE INSERT ON endpoints FOR EACH ROW "
                  "EXECUTE FUNCTION hang_up()"],
        2, "terminating connection due to administrator command; nothing was restored"),
    "the connection drops at COMMIT": (
        [HANG_UP, "CREATE CONSTRAINT TRIGGER t AFTER INSERT ON audit_log DEFERRABLE INITIALLY "
                  "DEFERRED FOR EACH ROW WHEN (NEW.action = 'backup.restore') "
                  "EXECUTE FUNCTION hang_up()"],
        2, "whether it was committed is unknown"),
    "the target holds state": (
        ["INSERT INTO endpoints (model, version, address, region, zone) "
         "VALUES ('tiny', '9', '127.0.0.1:9', '', '')"],
        2, "already holds state: restore into an empty store"),
    "the target's schema is newer": (
        ["UPDATE schema_version SET version = 99"],
        2, "has schema version 99, written by a newer meshserve (this one knows up to 1)"),
    "the archive's schema is newer": (
        [], 1, "the archive's store has schema version 99, written by a newer meshserve"),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_each_failed_restore_says_one_line_and_leaves_the_target_as_it_was(
        mesh, archive: Path, tmp_path: Path, target_url: str, capsys, failure: str) -> None:
    data, _ = mesh
    statements, code, says = FAILURES[failure]
    raw(target_url, *statements)
    if failure == "the archive's schema is newer":
        archive = newer_archive(archive, data, tmp_path)
    with psycopg.connect(target_url) as conn:
        before = {table: conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                  for table in (*TABLES, "schema_version")}
    restored = tmp_path / "restored"
    capsys.readouterr()
    assert cli.main(["restore", str(archive), "--data-dir", str(restored), "--store", target_url,
                     "--trusted", str(data / "keys" / "trusted")]) == code
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert says in captured.err
    assert captured.err.startswith("refused: " if code == 1 else "error: ")
    with psycopg.connect(target_url) as conn:
        after = {table: conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                 for table in before}
    assert after == before
    assert not restored.exists()


def test_a_store_that_cannot_be_reached_is_one_line(mesh, archive: Path, tmp_path: Path,
                                                    capsys) -> None:
    data, _ = mesh
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    restored = tmp_path / "restored"
    assert cli.main(["restore", str(archive), "--data-dir", str(restored), "--store",
                     f"postgresql://postgres:s3cret@127.0.0.1:{port}/meshserve_test",
                     "--trusted", str(data / "keys" / "trusted")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot connect to the PostgreSQL store: ") and \
        err.count("\n") == 1, err
    assert "Connection refused" in err and "s3cret" not in err
    assert not restored.exists()
