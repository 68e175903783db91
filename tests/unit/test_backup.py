"""Backup and restore of a data directory: real SQLite stores, a real registry, real tar
archives on a temporary directory; every refusal checked for its reason and for writing
nothing."""

import errno
import io
import itertools
import os
import shutil
import sqlite3
import tarfile
import threading
from contextlib import closing
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshserve.common import artifacts, model_files
from meshserve.common.errors import FailedPrecondition
from meshserve.ingress.submissions import SubmissionStore, connect
from meshserve.mesh import backup
from meshserve.mesh.policy import Endpoint, TrafficPolicy
from meshserve.mesh.registry import Push, Registry
from meshserve.mesh.store import TABLES, Store
from meshserve.tools import cli
from meshserve.tools import restore as restore_tool
from meshserve.tools.backup import Layout, create_backup
from meshserve.tools.restore import restore_backup
from meshserve.tools.up import check_certs
from tests.polling import until_sync
from tests.torchscript_models import torchscript_shaped
from tests.unit.test_store import FakeClock

CONFIG = """name: "tiny"
max_batch_size: 4
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""
ARTIFACT = torchscript_shaped(bytes(range(256)) * 64)
ENCRYPTED = torchscript_shaped(bytes(range(256))[::-1] * 64)
SECRETS = ("auth/signing.key", "keys/kek", "keys/signing.key", "tls/ca.key")


def make_mesh(data: Path) -> None:
    """A data directory as `meshserve up` leaves it, with state in every table."""
    (data / "models" / "tiny").mkdir(parents=True)
    (data / "models" / "tiny" / "config.pbtxt").write_text(CONFIG)
    for name, text in {"tls/ca.crt": "CA", "tls/ca.key": "CA KEY", "auth/policy.yaml": "rules: []",
                       "auth/signing.key": "TOKEN KEY"}.items():
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text(text)
    (data / "tls" / "ca.key").chmod(0o600)
    key = model_files.signing_key(data / "keys" / "signing.key", create=True)
    model_files.trust(key, data / "keys" / "trusted")
    kek = model_files.ensure_kek(data / "keys" / "kek")
    with Store.open(data / "mesh.db", clock=FakeClock()) as store:
        registry = Registry(store, data / "models", data / "registry", key, kek)
        registry.push(Push("tiny", "1", ARTIFACT), actor="client/developer")
        registry.push(Push("tiny", "2", ENCRYPTED, encrypt=True), actor="client/developer")
        store.put_policy(TrafficPolicy("tiny", {"1": 100}), actor="alice")
        store.put_policy(TrafficPolicy("tiny", {"1": 90, "2": 10}), actor="alice")
        store.put_policy(TrafficPolicy("tiny", {"1": 50, "2": 50}), actor="alice")
        store.rollback("tiny", actor="bob", reason="too fast")
        store.put_endpoint(Endpoint("tiny", "1", "127.0.0.1:7001"), actor="up")
        store.put_endpoint(Endpoint("tiny", "2", "127.0.0.1:7002", region="local"), actor="up")
        store.put_canary("tiny", {"to": "2", "step": 1, "state": "running"}, actor="alice",
                         action="canary.start")
    ids = (f"sub-{n}" for n in itertools.count())
    submissions = SubmissionStore(connect(data / "async.db"), 100, new_id=lambda: next(ids))
    for n in range(5):
        submissions.submit("tiny", f"request {n}".encode())
    [claimed] = submissions.claim(1)
    submissions.finish(claimed.id, b"answer")


def signing_key(data: Path) -> Ed25519PrivateKey:
    return model_files.signing_key(data / "keys" / "signing.key")


def trusted(data: Path) -> dict:
    return model_files.trusted_signers(data / "keys" / "trusted")


def file_digests(data: Path) -> dict[str, str]:
    return {str(path.relative_to(data)): artifacts.sha256_digest(path.read_bytes())
            for part in backup.PARTS for path in sorted((data / part).rglob("*"))
            if path.is_file()}


def rows(path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


SUBMISSIONS = "SELECT id, model, request, state, response FROM submissions ORDER BY seq"


@pytest.fixture
def mesh(tmp_path: Path) -> Path:
    data = tmp_path / "mesh"
    make_mesh(data)
    return data


@pytest.fixture
def archive(mesh: Path, tmp_path: Path) -> Path:
    result = create_backup(Layout.of(mesh), tmp_path, signing_key(mesh), actor="ops")
    return result.path


def test_a_restore_brings_back_the_same_state(mesh: Path, tmp_path: Path) -> None:
    result = create_backup(Layout.of(mesh), tmp_path / "backups", signing_key(mesh),
                           kek=model_files.read_kek(mesh / "keys" / "kek"), actor="ops")
    with Store.open(mesh / "mesh.db") as live:
        before = live.export_tables()
        live_audit = live.audit()
    assert live_audit[-1].action == "backup.create"  # recorded after the snapshot
    assert result.point.audit_seq == len(live_audit) - 1
    assert result.manifest["submissions"] == {"DONE": 1, "PENDING": 4}

    target = tmp_path / "restored"
    restored = restore_backup(result.path, Layout.of(target), trusted(mesh),
                              kek=model_files.read_kek(mesh / "keys" / "kek"), actor="ops")
    assert restored.ok and restored.keys_restored == len(SECRETS)
    with Store.open(target / "mesh.db") as store:
        after = store.export_tables()
        audit = store.audit()
        assert store.policies() == {"tiny": TrafficPolicy("tiny", {"1": 90, "2": 10})}
        assert store.previous_policy("tiny") == TrafficPolicy("tiny", {"1": 100})
        assert store.canaries() == {"tiny": {"to": "2", "step": 1, "state": "running"}}
        assert [e.address for e in store.endpoints()] == ["127.0.0.1:7001", "127.0.0.1:7002"]
        assert [(v.version, v.digest) for v in store.model_versions("tiny")] == [
            ("1", artifacts.sha256_digest(ARTIFACT)),
            ("2", artifacts.sha256_digest(ENCRYPTED))]
        assert store.verify_audit(anchor=result.point.audit_head) == []
    for table in TABLES:
        if table != "audit_log":
            assert after[table] == before[table], table
    assert audit[:-1] == live_audit[:-1]  # up to the recovery point, then the restore
    assert (audit[-1].action, audit[-1].subject, audit[-1].prev_hash) == (
        "backup.restore", result.path.name, result.point.audit_head)
    assert file_digests(target) == file_digests(mesh)
    for secret in SECRETS:
        assert (target / secret).stat().st_mode & 0o777 == 0o600
    assert rows(target / "async.db", SUBMISSIONS) == rows(mesh / "async.db", SUBMISSIONS)


def test_a_backup_under_load_is_one_consistent_snapshot(mesh: Path, tmp_path: Path) -> None:
    stop = threading.Event()
    written = []

    def write() -> None:
        with Store.open(mesh / "mesh.db") as store:
            submissions = SubmissionStore(connect(mesh / "async.db"), 10_000)
            for n in itertools.count(10):
                if stop.is_set():
                    return
                store.put_policy(TrafficPolicy("tiny", {"1": n % 100, "2": 100 - n % 100}),
                                 actor="load")
                written.append(submissions.submit("tiny", b"x"))

    writer = threading.Thread(target=write)
    writer.start()
    try:
        until_sync(lambda: len(written) >= 20, 30, "the writer's first rows")
        result = create_backup(Layout.of(mesh), tmp_path, signing_key(mesh), actor="ops")
        until_sync(lambda: len(written) >= result.manifest["submissions"]["PENDING"] + 20, 30,
                   "the writer writing on after the backup")
    finally:
        stop.set()
        writer.join(30)
    target = tmp_path / "restored"
    assert restore_backup(result.path, Layout.of(target), trusted(mesh)).ok
    with Store.open(target / "mesh.db") as restored, Store.open(mesh / "mesh.db") as live:
        seq = result.point.audit_seq
        assert restored.audit()[:seq] == live.audit()[:seq]
        history = restored.export_tables()["policy_history"].rows
        live_history = live.export_tables()["policy_history"].rows
        assert history == live_history[:len(history)]  # a prefix: nothing torn
        last_set = [e for e in restored.audit()[:seq] if e.action == "policy.set"][-1]
        assert restored.policy("tiny") == TrafficPolicy.from_json(last_set.after)
    restored_ids = [row[0] for row in rows(target / "async.db", SUBMISSIONS)]
    live_ids = [row[0] for row in rows(mesh / "async.db", SUBMISSIONS)]
    assert restored_ids == live_ids[:len(restored_ids)] and len(restored_ids) < len(live_ids)


def test_keys_stay_out_unless_asked_for_and_then_only_encrypted(mesh: Path, archive: Path,
                                                                tmp_path: Path) -> None:
    content = archive.read_bytes()
    for secret in SECRETS:
        assert (mesh / secret).read_bytes() not in content, secret
    manifest = archive_manifest(archive)
    assert manifest["keys"] is None and manifest["secrets_left_out"] == list(SECRETS)
    target = tmp_path / "restored"
    assert restore_backup(archive, Layout.of(target), trusted(mesh)).keys_restored == 0
    assert not any((target / secret).exists() for secret in SECRETS)

    backup_kek = artifacts.new_kek()
    with_keys = create_backup(Layout.of(mesh), tmp_path / "with-keys.tar", signing_key(mesh),
                              kek=backup_kek)
    content = with_keys.path.read_bytes()
    for secret in SECRETS:
        assert (mesh / secret).read_bytes() not in content, secret
    with pytest.raises(backup.BackupRefused, match="does not unwrap|wrapped by key-encryption"):
        restore_backup(with_keys.path, Layout.of(tmp_path / "wrong-kek"), trusted(mesh),
                       kek=artifacts.new_kek())
    assert not (tmp_path / "wrong-kek" / "models").exists()


def archive_manifest(path: Path) -> dict:
    import json

    with tarfile.open(path) as tar:
        return json.loads(tar.extractfile(backup.MANIFEST).read())


def rewrite(archive: Path, out: Path, change) -> Path:
    """A copy of the archive with each member passed through `change(name, data)` (None:
    left out)."""
    with tarfile.open(archive) as source, tarfile.open(out, "w") as target:
        for info in source:
            data = change(info.name, source.extractfile(info).read())
            if data is not None:
                info.size = len(data)
                target.addfile(info, io.BytesIO(data))
    return out


def refused(archive: Path, mesh: Path, target: Path, match: str) -> None:
    with pytest.raises(backup.BackupRefused, match=match):
        restore_backup(archive, Layout.of(target), trusted(mesh))
    assert not any((target / part).exists() for part in backup.PARTS)
    assert not (target / "async.db").exists()


def test_a_flipped_byte_is_refused_naming_what_changed(mesh: Path, archive: Path,
                                                       tmp_path: Path) -> None:
    content = bytearray(archive.read_bytes())
    at = content.index(ARTIFACT) + 1000
    content[at] ^= 0x01
    flipped = tmp_path / "flipped.tar"
    flipped.write_bytes(content)
    refused(flipped, mesh, tmp_path / "a", r"files/models/tiny/1/model.pt was altered")

    def edit_manifest(name: str, data: bytes) -> bytes:
        return data.replace(b'"audit_seq": ', b'"audit_seq": 1') if name == backup.MANIFEST \
            else data

    refused(rewrite(archive, tmp_path / "manifest.tar", edit_manifest), mesh, tmp_path / "b",
            "backup signature does not verify")


def test_a_missing_or_unlisted_member_and_a_truncated_archive_are_refused(
        mesh: Path, archive: Path, tmp_path: Path) -> None:
    missing = rewrite(archive, tmp_path / "missing.tar",
                      lambda name, data: None if name == backup.ASYNC_MEMBER else data)
    refused(missing, mesh, tmp_path / "a", "incomplete: async.db is listed in its manifest but "
                                           "missing")

    def add_extra(name: str, data: bytes) -> bytes:
        return data

    extra = rewrite(archive, tmp_path / "extra.tar", add_extra)
    with tarfile.open(extra, "a") as tar:
        info = tarfile.TarInfo("files/models/tiny/3/model.pt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    refused(extra, mesh, tmp_path / "b", "holds files/models/tiny/3/model.pt, which its manifest "
                                         "does not list")
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(archive.read_bytes()[:archive.stat().st_size // 2])
    refused(truncated, mesh, tmp_path / "c", "damaged or truncated")
    refused(tmp_path / "absent.tar", mesh, tmp_path / "d", "no archive at")


def test_an_archive_of_another_mesh_is_refused(mesh: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    make_mesh(other)
    foreign = create_backup(Layout.of(other), tmp_path / "foreign.tar", signing_key(other))
    refused(foreign.path, mesh, tmp_path / "a",
            r"backup signed by an unknown key \(key id ed25519:[0-9a-f]{16}\); the keys trusted "
            r"here: ed25519:[0-9a-f]{16} \(an archive of another mesh is refused\)")


def test_a_restore_needs_an_empty_destination(mesh: Path, archive: Path) -> None:
    with pytest.raises(FailedPrecondition, match="mesh is not empty"):
        restore_backup(archive, Layout.of(mesh), trusted(mesh))


def test_audit_verify_passes_after_a_restore_and_fails_once_a_row_is_edited(
        mesh: Path, archive: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "restored"
    code = cli.main(["restore", str(archive), "--data-dir", str(target), "--trusted",
                     str(mesh / "keys" / "trusted")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "recovery point: 2026-" in out and "audit log intact:" in out
    assert cli.main(["audit", "verify", "--store", str(target / "mesh.db")]) == 0
    with sqlite3.connect(target / "mesh.db") as db:
        db.execute("UPDATE audit_log SET reason = 'edited' WHERE seq = 3")
    capsys.readouterr()
    assert cli.main(["audit", "verify", "--store", str(target / "mesh.db")]) == 1
    assert "entry 3 was altered" in capsys.readouterr().out


def test_the_commands_say_what_they_did_and_keep_n_archives(mesh: Path, tmp_path: Path,
                                                             capsys) -> None:
    out_dir = tmp_path / "backups"
    out_dir.mkdir()
    for _ in range(3):
        assert cli.main(["backup", "--data-dir", str(mesh), "--out", str(out_dir),
                         "--keep", "2"]) == 0
    out = capsys.readouterr().out
    assert "backup written:" in out and "recovery point:" in out and "pruned:" in out
    assert "submissions: 1 done, 4 pending" in out
    assert len(list(out_dir.iterdir())) == 2
    with Store.open(mesh / "mesh.db") as store:
        assert [e.action for e in store.audit()][-3:] == ["backup.create"] * 3
    newest = max(out_dir.iterdir())
    assert cli.main(["restore", str(newest), "--data-dir", str(mesh)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert cli.main(["restore", str(newest), "--data-dir", str(tmp_path / "x"), "--trusted",
                     str(tmp_path / "nowhere")]) == 2
    assert "no trusted key at" in capsys.readouterr().err
    assert cli.main(["backup", "--data-dir", str(tmp_path / "typo"), "--signing-key",
                     str(mesh / "keys" / "signing.key")]) == 2
    assert "no store at" in capsys.readouterr().err
    unwritable = newest / "archive.tar"  # under a file: no directory to write into
    assert cli.main(["backup", "--data-dir", str(mesh), "--out", str(unwritable)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: [Errno ") and str(newest) in err and err.count("\n") == 1
    assert not (tmp_path / "typo").exists()


def test_retention_keeps_the_newest() -> None:
    names = [backup.archive_name(f"2026-12-0{day}T00:00:00.000000Z") for day in (3, 1, 2)]
    assert backup.to_prune([*names, "notes.txt"], 2) == [names[1]]
    assert backup.to_prune(names, 5) == []
    with pytest.raises(ValueError, match="at least 1"):
        backup.to_prune(names, 0)


def test_retention_prunes_only_time_named_archives_and_never_the_one_just_written() -> None:
    old, new, future = (backup.archive_name(f"{day}T08:00:00.000000Z")
                        for day in ("2026-12-01", "2026-12-06", "2027-01-01"))
    hand_named = ["meshserve-backup-before-upgrade.tar", "meshserve-backup-zzz.tar",
                  "meshserve-backup-20261201T0800Z.tar"]
    assert backup.to_prune([*hand_named, new], 1, written=new) == []
    assert backup.to_prune([*hand_named, old, new], 1, written=new) == [old]
    # An archive dated later (a clock set wrong once) does not push out the one just written.
    assert backup.to_prune([old, future, new], 1, written=new) == [old, future]
    assert backup.to_prune([old, future, new], 2, written=new) == [old]
    assert backup.to_prune([future, old], 1) == [old]


def test_keep_never_prunes_a_hand_named_archive_or_the_new_one(mesh: Path, tmp_path: Path,
                                                               capsys) -> None:
    out_dir = tmp_path / "backups"
    named = out_dir / "meshserve-backup-before-upgrade.tar"
    assert cli.main(["backup", "--data-dir", str(mesh), "--out", str(named)]) == 0
    assert cli.main(["backup", "--data-dir", str(mesh), "--out", str(out_dir), "--keep",
                     "1"]) == 0
    out = capsys.readouterr().out
    assert "pruned:" not in out
    [written] = [line.split()[2] for line in out.splitlines()
                 if line.startswith("backup written:")][-1:]
    assert sorted(out_dir.iterdir()) == sorted([named, Path(written)])
    future = out_dir / backup.archive_name("2099-01-01T00:00:00.000000Z")  # a wrong clock's
    future.write_bytes(b"")
    assert cli.main(["backup", "--data-dir", str(mesh), "--out", str(out_dir), "--keep",
                     "1"]) == 0
    out = capsys.readouterr().out
    newest = Path(out.split("backup written: ", 1)[1].split(" (", 1)[0])
    assert f"pruned: {Path(written).name}, {future.name}" in out
    assert sorted(out_dir.iterdir()) == sorted([named, newest])


def test_a_backup_never_overwrites_a_file(mesh: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "b.tar"
    kek = tmp_path / "backup.kek"
    model_files.ensure_kek(kek)
    assert cli.main(["backup", "--data-dir", str(mesh), "--out", str(target),
                     "--include-keys", "--kek-file", str(kek)]) == 0
    keyed = target.read_bytes()
    capsys.readouterr()
    assert cli.main(["backup", "--data-dir", str(mesh), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {target} exists: a backup never overwrites a file; give another " \
                  "--out (a new FILE.tar, or a directory)\n"
    assert target.read_bytes() == keyed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.tar")]
    folder = tmp_path / "archives.tar"  # a directory, named so: a new archive in it
    folder.mkdir()
    assert cli.main(["backup", "--data-dir", str(mesh), "--out", str(folder)]) == 0
    assert len(list(folder.glob("meshserve-backup-*.tar"))) == 1


def test_the_backup_says_whether_the_asynchronous_store_is_empty_or_absent(
        mesh: Path, tmp_path: Path, capsys) -> None:
    (mesh / "async.db").unlink()
    connect(mesh / "async.db").close()  # as the ingress leaves it before any submission
    assert cli.main(["backup", "--data-dir", str(mesh), "--out", str(tmp_path / "a.tar")]) == 0
    assert "submissions: none (the asynchronous store is empty)\n" in capsys.readouterr().out
    assert archive_manifest(tmp_path / "a.tar")["submissions"] == {}
    target = tmp_path / "restored"
    assert restore_backup(tmp_path / "a.tar", Layout.of(target), trusted(mesh)).ok
    assert rows(target / "async.db", SUBMISSIONS) == []
    for name in os.listdir(mesh):
        if name.startswith("async.db"):
            (mesh / name).unlink()
    assert cli.main(["backup", "--data-dir", str(mesh), "--out", str(tmp_path / "b.tar")]) == 0
    assert "submissions: no asynchronous store\n" in capsys.readouterr().out


def listing(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


@pytest.mark.parametrize("fails", ["move", "import"])
def test_a_restore_that_fails_part_way_takes_back_what_it_placed(
        mesh: Path, archive: Path, tmp_path: Path, monkeypatch, capsys, fails: str) -> None:
    target = tmp_path / "r9"
    (target / "keys" / "trusted").mkdir(parents=True)
    shutil.copy(next((mesh / "keys" / "trusted").glob("*.pub")), target / "keys" / "trusted")
    before = listing(target)
    move, restore_tables = shutil.move, Store.restore_tables

    def failing_move(source, destination):
        if "registry" in str(destination):
            raise OSError(errno.EROFS, "Read-only file system", str(destination))
        return move(source, destination)

    def failing_import(self, tables, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(target / "mesh.db"))

    if fails == "move":
        monkeypatch.setattr(restore_tool.shutil, "move", failing_move)
    else:
        monkeypatch.setattr(Store, "restore_tables", failing_import)
    assert cli.main(["restore", str(archive), "--data-dir", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {target}/")
    assert ("Read-only file system" if fails == "move" else "No space left") in err
    assert err.endswith("nothing was restored (what this restore had placed is removed)\n")
    assert listing(target) == before  # the trusted key it was given stays

    monkeypatch.setattr(restore_tool.shutil, "move", move)
    monkeypatch.setattr(Store, "restore_tables", restore_tables)
    assert cli.main(["restore", str(archive), "--data-dir", str(target)]) == 0  # a retry


def test_a_restore_whose_audit_entry_fails_leaves_an_existing_store_empty(
        mesh: Path, archive: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "r"
    with Store.open(target / "mesh.db"):  # an empty store, given to restore into
        pass
    with closing(sqlite3.connect(target / "mesh.db")) as db:  # the step after the import fails
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON audit_log "
                   "WHEN NEW.action = 'backup.restore' "
                   "BEGIN SELECT RAISE(ABORT, 'audit_log is read-only'); END")
    before = listing(target)
    with pytest.raises(Exception, match="audit_log is read-only"):
        restore_backup(archive, Layout.of(target), trusted(mesh))
    assert listing(target) == before
    assert {table: rows(target / "mesh.db", f"SELECT * FROM {table}")
            for table in TABLES} == dict.fromkeys(TABLES, [])
    args = ["restore", str(archive), "--data-dir", str(target), "--trusted",
            str(mesh / "keys" / "trusted")]
    assert cli.main(args) == 2
    assert capsys.readouterr().err == (
        f"error: restoring into the store at {target / 'mesh.db'} failed: audit_log is "
        "read-only; nothing was restored (its transaction was rolled back)\n")

    with closing(sqlite3.connect(target / "mesh.db")) as db:
        db.execute("DROP TRIGGER refuse")
    assert cli.main(args) == 0  # a retry
    assert len(rows(target / "mesh.db", "SELECT * FROM policy_history")) == 4


def test_a_refused_restore_leaves_nothing_behind(mesh: Path, tmp_path: Path, capsys) -> None:
    kek = model_files.read_kek(mesh / "keys" / "kek")
    keyed = create_backup(Layout.of(mesh), tmp_path / "keyed.tar", signing_key(mesh), kek=kek)
    wrong = tmp_path / "wrong.kek"
    model_files.ensure_kek(wrong)
    for archive, flags in ((tmp_path / "nope.tar", []), (keyed.path, ["--kek-file", str(wrong)])):
        target = tmp_path / "new"
        assert cli.main(["restore", str(archive), "--data-dir", str(target), "--trusted",
                         str(mesh / "keys" / "trusted"), *flags]) == 1
        assert not target.exists()
        target.mkdir()  # an empty directory made for it stays, empty
        assert cli.main(["restore", str(archive), "--data-dir", str(target), "--trusted",
                         str(mesh / "keys" / "trusted"), *flags]) == 1
        assert list(target.iterdir()) == []
        target.rmdir()
    capsys.readouterr()


def test_a_directory_that_holds_anything_is_refused(mesh: Path, archive: Path,
                                                    tmp_path: Path, capsys) -> None:
    trusted_key = ["--trusted", str(mesh / "keys" / "trusted")]
    target = tmp_path / "r"
    target.mkdir()
    (target / "foo").write_text("mine")
    assert cli.main(["restore", str(archive), "--data-dir", str(target), *trusted_key]) == 2
    assert capsys.readouterr().err == (
        f"error: {target} is not empty (foo is there): restore into an empty data directory "
        "(move the old one away first)\n")
    assert listing(target) == ["foo"]
    (target / "foo").unlink()
    (target / "keys").write_text("a file where a directory goes")
    assert cli.main(["restore", str(archive), "--data-dir", str(target), *trusted_key]) == 2
    assert "(keys is there)" in capsys.readouterr().err
    (target / "keys").unlink()
    for empty in ("lost+found", "models", "keys/trusted"):  # a new volume, empty directories
        (target / empty).mkdir(parents=True)
    assert cli.main(["restore", str(archive), "--data-dir", str(target), *trusted_key]) == 0
    assert file_digests(target) == {name: digest for name, digest in file_digests(mesh).items()
                                    if not backup.is_secret(name)}


def test_the_default_trusted_key_in_the_data_directory_is_not_in_the_way(
        mesh: Path, archive: Path, tmp_path: Path, capsys) -> None:
    key = next((mesh / "keys" / "trusted").glob("*.pub"))
    for name in (key.name, "registry.pub"):  # as the archive names it, or as the operator
        target = tmp_path / name
        (target / "keys" / "trusted").mkdir(parents=True)
        shutil.copy(key, target / "keys" / "trusted" / name)
        assert cli.main(["restore", str(archive), "--data-dir", str(target)]) == 0, \
            capsys.readouterr().err
        assert (target / "keys" / "trusted" / name).read_bytes() == key.read_bytes()
        assert (target / "keys" / "trusted" / key.name).read_bytes() == key.read_bytes()
    target = tmp_path / "pem"
    (target / "keys").mkdir(parents=True)
    shutil.copy(key, target / "keys" / "trusted")  # a PEM file where the archive has a folder
    capsys.readouterr()
    assert cli.main(["restore", str(archive), "--data-dir", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {target / 'keys' / 'trusted'} is in the way of the "
                          f"archive's files/keys/trusted/{key.name}: move it away")
    assert listing(target) == ["keys", "keys/trusted"]


def test_restore_errors_are_one_line(mesh: Path, archive: Path, tmp_path: Path,
                                     capsys) -> None:
    assert cli.main(["restore", str(archive.parent), "--data-dir", str(tmp_path / "r"),
                     "--trusted", str(mesh / "keys" / "trusted")]) == 1
    assert capsys.readouterr().err == (
        f"refused: {archive.parent} is a directory, not an archive: name the "
        "meshserve-backup-<time>.tar in it\n")
    assert not (tmp_path / "r").exists()


def test_up_after_a_keyless_restore_says_to_restore_the_keys(mesh: Path, archive: Path,
                                                             tmp_path: Path) -> None:
    target = tmp_path / "restored"
    assert restore_backup(archive, Layout.of(target), trusted(mesh)).ok
    with pytest.raises(RuntimeError) as raised:
        check_certs(target)
    message = str(raised.value)
    assert message.startswith(f"{target / 'tls'} has certificates without their private keys "
                              "(ca.crt), as a backup restored without its keys leaves it")
    assert f"meshserve restore ARCHIVE --data-dir {target} --kek-file FILE" in message
    assert "rm -r" not in message
    check_certs(tmp_path / "fresh")  # a new data directory: development certificates made
    assert (tmp_path / "fresh" / "tls" / "ca.key").exists()
