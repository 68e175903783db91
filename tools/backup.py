"""`meshserve backup`: one signed archive of everything a mesh remembers, taken online.

    meshserve backup [--data-dir DIR] [--out DIR|FILE] [--keep N]
                     [--include-keys --kek-file FILE] [--signing-key PEM]
                     [--store PATH|URL] [--async-store PATH]
                     [--model-repository DIR] [--registry-dir DIR]

The control plane's store is read in one snapshot through its dialect layer (SQLite: a read
transaction; PostgreSQL: a REPEATABLE READ transaction), the asynchronous store with
SQLite's online backup API, then the files; nothing stops or waits for the mesh. What the
archive holds, and how it is signed, is `meshserve.mesh.backup`. The backup is recorded in
the audit log (`backup.create`, with the manifest's digest and the recovery point).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import io
import json
import os
import socket
import sqlite3
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshserve.common import artifacts, model_files
from meshserve.common.errors import FailedPrecondition, ServingError
from meshserve.mesh import backup
from meshserve.mesh.audit import utc_timestamp
from meshserve.mesh.database import SCHEMA_VERSION
from meshserve.mesh.database_urls import missing_store_file
from meshserve.mesh.store import Store
from meshserve.tools.arguments import positive_int


@dataclass(frozen=True)
class Layout:
    """Where a mesh's state lives: `meshserve up`'s data directory unless told otherwise."""

    store: str
    async_store: Path
    parts: dict[str, Path]
    data_dir: Path | None = None

    @classmethod
    def of(cls, data_dir: Path, store: str = "", async_store: Path | None = None,
           model_repository: Path | None = None, registry_dir: Path | None = None) -> Layout:
        parts = {part: data_dir / part for part in backup.PARTS}
        if model_repository is not None:
            parts["models"] = model_repository
        if registry_dir is not None:
            parts["registry"] = registry_dir
        return cls(store or str(data_dir / "mesh.db"), async_store or data_dir / "async.db",
                   parts, data_dir)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Layout:
        return cls.of(args.data_dir, args.store, args.async_store, args.model_repository,
                      args.registry_dir)


@dataclass(frozen=True)
class BackupResult:
    path: Path
    size: int
    manifest: dict
    point: backup.RecoveryPoint
    pruned: list[str]


def default_actor() -> str:
    """Who the audit log says took a backup or restored one: the OS user at this host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid:{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def add_member(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode & 0o777, 0
    tar.addfile(info, io.BytesIO(data))


def snapshot_async_store(path: Path, into: Path) -> dict[str, int]:
    """SQLite's online backup of the asynchronous store into `into`; rows per state."""
    with contextlib.closing(sqlite3.connect(path, timeout=5.0)) as source, \
            contextlib.closing(sqlite3.connect(into)) as target:
        source.backup(target)
        if not target.execute("SELECT 1 FROM sqlite_master WHERE name = 'submissions'"
                              ).fetchall():
            return {}  # created, and no submission yet
        rows = target.execute("SELECT state, count(*) FROM submissions GROUP BY state")
        return {state: count for state, count in sorted(rows.fetchall())}


def data_files(parts: dict[str, Path]) -> list[tuple[str, Path]]:
    """("part/relative/path", file) for every file of every part, skipping what is being
    written (names starting with "." are temporary files and staging directories)."""
    found = []
    for part, directory in sorted(parts.items()):
        if not directory.is_dir():
            continue
        for path in sorted(directory.rglob("*")):
            relative = path.relative_to(directory)
            if path.is_file() and not path.is_symlink() and \
                    not any(name.startswith(".") for name in relative.parts):
                found.append((f"{part}/{relative.as_posix()}", path))
    return found


def create_backup(layout: Layout, out: Path, signing_key: Ed25519PrivateKey, *,
                  kek: bytes | None = None, actor: str = "", keep: int | None = None,
                  clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> BackupResult:
    """Write the archive to `out` (a file named `*.tar`, else a directory, where a new archive
    is named by time), sign it, prune the directory to the newest `keep` and audit the
    backup."""
    actor = actor or default_actor()
    missing = missing_store_file(layout.store)
    if missing:
        raise FailedPrecondition(f"no store at {missing}: give the control plane's "
                                 "--store (or the --data-dir that holds mesh.db)")
    created_at = utc_timestamp(clock())
    to_file = out.suffix == backup.ARCHIVE_SUFFIX and not out.is_dir()
    path = out if to_file else out / backup.archive_name(created_at)
    refuse_existing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with Store.open(layout.store) as store:
        tables = store.export_tables()
        point = backup.recovery_point(tables, created_at)
        members: dict[str, dict] = {}
        temporary = Path(tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")[1])
        try:
            with tarfile.open(temporary, "w", format=tarfile.PAX_FORMAT) as tar:
                def add(name: str, data: bytes, mode: int) -> None:
                    members[name] = backup.member(data, mode)
                    add_member(tar, name, data, mode)

                add(backup.STORE_MEMBER, backup.store_bytes(tables), 0o600)
                submissions = None
                if layout.async_store.is_file():
                    snapshot = temporary.with_name(temporary.name + ".async")
                    try:
                        submissions = snapshot_async_store(layout.async_store, snapshot)
                        add(backup.ASYNC_MEMBER, snapshot.read_bytes(), 0o600)
                    finally:
                        snapshot.unlink(missing_ok=True)
                secrets = add_files(layout.parts, add)
                envelope = None
                if kek is not None and secrets:
                    envelope, ciphertext = backup.encrypt_keys(keys_tar(secrets), kek)
                    add(backup.KEYS_MEMBER, ciphertext, 0o600)
                manifest = backup.build_manifest(
                    created_at=created_at, created_by=actor, point=point,
                    store={"schema_version": SCHEMA_VERSION,
                           "rows": {name: len(t.rows) for name, t in tables.items()}},
                    submissions=submissions, members=members, keys=envelope,
                    secrets_left_out=[] if envelope else sorted(secrets))
                manifest_file = artifacts.manifest_bytes(manifest)
                add_member(tar, backup.MANIFEST, manifest_file, 0o644)
                add_member(tar, backup.SIGNATURE, backup.sign(manifest, signing_key), 0o644)
            with open(temporary, "rb") as written:
                os.fsync(written.fileno())
            refuse_existing(path)  # written meanwhile
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        size = path.stat().st_size
        store.append_audit(actor, "backup.create", path.name, after=json.dumps({
            "manifest_digest": artifacts.sha256_digest(manifest_file), "bytes": size,
            "recovery_point": manifest["recovery_point"], "keys": envelope is not None},
            sort_keys=True))
    pruned = []
    if keep is not None and not to_file:
        pruned = backup.to_prune([p.name for p in out.iterdir()], keep, written=path.name)
        for name in pruned:
            (out / name).unlink(missing_ok=True)
    return BackupResult(path, size, manifest, point, pruned)


def refuse_existing(path: Path) -> None:
    """A backup never replaces a file: an archive there may be the only copy of its state."""
    if os.path.lexists(path):
        raise FailedPrecondition(f"{path} exists: a backup never overwrites a file; give "
                                 "another --out (a new FILE.tar, or a directory)")


def add_files(parts: dict[str, Path], add: Callable[[str, bytes, int], None]
              ) -> dict[str, tuple[bytes, int]]:
    """Add every non-secret file under `files/`; return the secrets (path → bytes, mode)."""
    secrets = {}
    for relative, path in data_files(parts):
        try:
            data, mode = path.read_bytes(), path.stat().st_mode
        except FileNotFoundError:  # renamed away while we walked: not part of the state
            continue
        if backup.is_secret(relative):
            secrets[relative] = (data, mode)
        else:
            add(backup.FILES_PREFIX + relative, data, mode)
    return secrets


def keys_tar(secrets: dict[str, tuple[bytes, int]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for relative, (data, mode) in sorted(secrets.items()):
            add_member(tar, relative, data, mode)
    return buffer.getvalue()


def describe(result: BackupResult) -> str:
    manifest = result.manifest
    keys = manifest["keys"]
    keys_line = (f"encrypted under {keys['wrapped_key']['kek_id']}" if keys else
                 f"left out ({len(manifest['secrets_left_out'])} secret files; "
                 "--include-keys --kek-file to carry them encrypted)")
    submissions = manifest["submissions"]
    pending = ("no asynchronous store" if submissions is None else
               ", ".join(f"{count} {state.lower()}" for state, count in submissions.items())
               or "none (the asynchronous store is empty)")
    lines = [f"backup written: {result.path} ({result.size:,} bytes, "
             f"{len(manifest['members'])} members)",
             f"recovery point: {result.point.describe()}; anything recorded or submitted "
             "later is not in it",
             f"submissions: {pending}", f"keys: {keys_line}"]
    if result.pruned:
        lines.append(f"pruned: {', '.join(result.pruned)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        key_path = args.signing_key or args.data_dir / "keys" / "signing.key"
        if not key_path.is_file():
            print(f"error: no signing key at {key_path}: give --signing-key (the registry's "
                  "Ed25519 key signs backups)", file=sys.stderr)
            return 2
        kek = None
        if args.include_keys:
            if args.kek_file is None:
                print("error: --include-keys needs --kek-file (the key-encryption key the "
                      "keys are encrypted under; keep it apart from the backups)",
                      file=sys.stderr)
                return 2
            kek = model_files.read_kek(args.kek_file)
        result = create_backup(Layout.from_args(args), args.out,
                               model_files.signing_key(key_path), kek=kek, actor=args.actor,
                               keep=args.keep)
    except ServingError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    except OSError as error:  # --out where the archive cannot be written, say
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(describe(result))
    return 0


def add_layout_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=Path(".meshserve"),
                        help="the mesh's data directory (default ./.meshserve)")
    parser.add_argument("--store", default="",
                        help="the control plane's store: a SQLite file or a postgresql:// URL "
                             "(default DIR/mesh.db)")
    parser.add_argument("--async-store", type=Path, default=None,
                        help="the ingress's asynchronous store (default DIR/async.db)")
    parser.add_argument("--model-repository", type=Path, default=None,
                        help="the model repository (default DIR/models)")
    parser.add_argument("--registry-dir", type=Path, default=None,
                        help="the registry's content store (default DIR/registry)")
    parser.add_argument("--actor", default="",
                        help="who the audit log names (default USER@HOST)")


def register(commands) -> None:
    parser = commands.add_parser("backup")
    add_layout_flags(parser)
    parser.add_argument("--out", type=Path, default=Path("."),
                        help="a directory (a new archive named by time in it) or a FILE.tar "
                             "(default .)")
    parser.add_argument("--keep", type=positive_int, default=None, metavar="N",
                        help="then delete all but the newest N archives in the --out directory")
    parser.add_argument("--signing-key", type=Path, default=None,
                        help="Ed25519 key (PEM) that signs the archive "
                             "(default DIR/keys/signing.key)")
    parser.add_argument("--include-keys", action="store_true",
                        help="also carry the private keys, encrypted under --kek-file")
    parser.add_argument("--kek-file", type=Path, default=None,
                        help="key-encryption key for --include-keys (32 bytes: raw, hex or "
                             "base64)")
    parser.set_defaults(func=run)
