"""`meshserve restore ARCHIVE`: a mesh's state back from a backup, checked before anything
is written.

    meshserve restore ARCHIVE [--data-dir DIR] [--trusted PEM|DIR] [--kek-file FILE]
                      [--store PATH|URL] [--async-store PATH]
                      [--model-repository DIR] [--registry-dir DIR]

The archive is unpacked into a staging directory and refused, with the reason, unless its
manifest is signed by a trusted key (`--trusted`, default DIR/keys/trusted: keep a copy of
the public key apart from the data directory) and every member matches it, and the registry's
rows match the signed manifests they name. Only then, into an empty destination: the files,
the asynchronous store, and the control plane's tables (SQLite or PostgreSQL, whichever the
archive came from); the audit chain continues with a `backup.restore` entry, and the restored
chain is verified, anchored at the archive's recovery point. The tables and that entry are
written in one transaction, the restore's last step: a restore that fails, at any step and
for any reason (a refused row, a dropped connection), leaves the store as it was and takes
back the files it placed, so the destination is left as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from meshserve.common import artifacts, model_files
from meshserve.common.errors import FailedPrecondition, ServingError
from meshserve.common.files import write_atomic
from meshserve.mesh import audit as audit_log
from meshserve.mesh import backup
from meshserve.mesh.database import SCHEMA_VERSION
from meshserve.mesh.database_urls import missing_store_file, postgresql_url, sqlite_path
from meshserve.mesh.store import Store
from meshserve.tools.audit import report
from meshserve.tools.backup import Layout, add_layout_flags, default_actor

CHUNK = 1 << 20


@dataclass(frozen=True)
class RestoreResult:
    manifest: dict
    point: backup.RecoveryPoint
    entries: int
    head: str
    problems: list[str]
    keys_restored: int

    @property
    def ok(self) -> bool:
        return not self.problems


def unpack(archive: Path, staging: Path) -> dict[str, str]:
    """Every member into `staging`; member name → sha256 digest. Refuses anything but plain
    files with relative names, repeated names, and a damaged or truncated archive."""
    digests: dict[str, str] = {}
    try:
        with open_archive(archive) as source, tarfile.open(fileobj=source, mode="r:") as tar:
            for info in tar:
                name = info.name
                parts = PurePosixPath(name).parts
                if not info.isreg() or not parts or name.startswith("/") or ".." in parts:
                    raise backup.BackupRefused(f"the archive holds '{name}', which is not a "
                                               "plain file with a relative name")
                if name in digests:
                    raise backup.BackupRefused(f"the archive holds '{name}' twice")
                digests[name] = copy_member(tar.extractfile(info), staging.joinpath(*parts))
    except (tarfile.TarError, EOFError) as error:
        raise backup.BackupRefused(f"the archive is damaged or truncated ({error})") from None
    return digests


def open_archive(archive: Path) -> BinaryIO:
    try:
        return open(archive, "rb")
    except FileNotFoundError:
        raise backup.BackupRefused(f"no archive at {archive}") from None
    except IsADirectoryError:
        raise backup.BackupRefused(f"{archive} is a directory, not an archive: name the "
                                   f"{backup.ARCHIVE_PREFIX}<time>{backup.ARCHIVE_SUFFIX} "
                                   "in it") from None
    except OSError as error:
        raise backup.BackupRefused(f"cannot read the archive {archive}: {error.strerror}"
                                   ) from None


def copy_member(source: io.BufferedReader, target: Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return "sha256:" + digest.hexdigest()


def verified_manifest(staging: Path, digests: dict[str, str],
                      trusted: dict[str, Ed25519PublicKey]) -> dict:
    if backup.MANIFEST not in digests:
        raise backup.BackupRefused(f"the archive has no {backup.MANIFEST}: it is damaged, "
                                   "truncated, or not a meshserve backup")
    content = {name: digest for name, digest in digests.items()
               if name not in (backup.MANIFEST, backup.SIGNATURE)}
    signature = staging / backup.SIGNATURE
    manifest = backup.check((staging / backup.MANIFEST).read_bytes(),
                            signature.read_bytes() if signature.exists() else None,
                            content, trusted)
    schema = manifest["store"]["schema_version"]
    if schema > SCHEMA_VERSION:
        raise backup.BackupRefused(f"the archive's store has schema version {schema}, written "
                                   f"by a newer meshserve (this one knows up to "
                                   f"{SCHEMA_VERSION})")
    return manifest


def repository_manifests(models: Path) -> dict[str, dict]:
    found = {}
    for manifest_file in models.glob(f"*/*/{artifacts.MANIFEST_FILENAME}"):
        try:
            manifest = json.loads(manifest_file.read_text("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
        found[f"{manifest_file.parent.parent.name}/{manifest_file.parent.name}"] = manifest
    return found


def secret_files(manifest: dict, staging: Path, kek: bytes | None) -> dict[str, tuple[bytes, int]]:
    """The archive's private keys (part/path → bytes, mode), decrypted; {} when the archive
    has none or no KEK was given."""
    if not manifest["keys"] or kek is None:
        return {}
    plain = backup.decrypt_keys(manifest["keys"], (staging / backup.KEYS_MEMBER).read_bytes(),
                                kek)
    secrets = {}
    with tarfile.open(fileobj=io.BytesIO(plain), mode="r:") as tar:
        for info in tar:
            parts = PurePosixPath(info.name).parts
            if not info.isreg() or len(parts) < 2 or ".." in parts or \
                    parts[0] not in backup.PARTS:
                raise backup.BackupRefused(f"the archive's keys hold '{info.name}', which is "
                                           "not a key file of the data directory")
            secrets[info.name] = (tar.extractfile(info).read(), info.mode)
    return secrets


class Placed:
    """What a restore has put in place, in order: files, and the directories it made for
    them. A failure takes back exactly these, and leaves what was there before."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def mkdir(self, directory: Path) -> None:
        missing = []
        while not os.path.lexists(directory):
            missing.append(directory)
            directory = directory.parent
        for made in reversed(missing):
            made.mkdir()
            self.paths.append(made)

    def file(self, path: Path) -> Path:
        """`path`, about to be written (its directory made)."""
        self.mkdir(path.parent)
        self.paths.append(path)
        return path

    def store(self, store: str) -> None:
        """A SQLite store the restore will create (and its journals); nothing for a store
        that exists or a PostgreSQL one."""
        missing = missing_store_file(store)
        if missing:
            self.file(Path(missing))
            self.paths += [Path(missing + suffix) for suffix in SQLITE_SIDECARS
                           if not os.path.lexists(missing + suffix)]

    def undo(self) -> None:
        for path in reversed(self.paths):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
        self.paths.clear()


SQLITE_SIDECARS = ("-wal", "-shm", "-journal")
# An empty file system's own directory: a new volume mounted as the data directory has it.
FILE_SYSTEM_DIRS = ("lost+found",)


def trusted_files(paths: list[Path]) -> set[Path]:
    """The files `model_files.trusted_signers` reads from `--trusted`."""
    found = set()
    for path in paths:
        found |= set(path.glob("*.pub")) if path.is_dir() else {path}
    return {file.parent.resolve() / file.name for file in found}


def store_files(store: str) -> set[Path]:
    """A SQLite store's file and journals (an empty store is accepted; one with rows is
    refused once opened)."""
    if postgresql_url(store) is not None or sqlite_path(store) == ":memory:":
        return set()
    path = Path(sqlite_path(store))
    return {path.parent.resolve() / (path.name + suffix) for suffix in ("", *SQLITE_SIDECARS)}


def first_file(directory: Path, allowed: set[Path]) -> Path | None:
    """The first thing under `directory` that is not a directory or one of `allowed` (empty
    directories hold nothing); `directory` itself when it is not a directory."""
    if not os.path.lexists(directory):
        return None
    if not directory.is_dir():
        return directory

    def unreadable(error: OSError) -> None:
        raise error

    for top, dirs, files in os.walk(directory, onerror=unreadable):
        here, resolved = Path(top), Path(top).resolve()
        if here == directory:
            dirs[:] = [name for name in dirs if name not in FILE_SYSTEM_DIRS]
        dirs.sort()
        links = [name for name in dirs if (here / name).is_symlink()]
        for name in sorted(files) + links:
            if resolved / name not in allowed:
                return here / name
    return None


def check_destination(layout: Layout, allowed: set[Path] | None = None) -> None:
    """Refuses a destination that holds anything: a file in the data directory or a part,
    or the asynchronous store. Not counted: empty directories, the trusted keys this restore
    checks the archive with (`allowed`; the default `--trusted` is DIR/keys/trusted), and
    the store's file."""
    allowed = (allowed or set()) | store_files(layout.store)
    roots = [(layout.data_dir, "")] if layout.data_dir else []
    roots += [(directory, f" ({part})") for part, directory in layout.parts.items()
              if not any(directory.is_relative_to(root) for root, _ in roots)]
    for root, what in roots:
        found = first_file(root, allowed)
        if found == root:
            raise FailedPrecondition(f"{root}{what} is not a directory: restore into an empty "
                                     "data directory")
        if found is not None:
            raise FailedPrecondition(f"{root}{what} is not empty ({found.relative_to(root)} is "
                                     "there): restore into an empty data directory (move the "
                                     "old one away first)")
    if os.path.lexists(layout.async_store):
        raise FailedPrecondition(f"{layout.async_store} exists: restore into an empty data "
                                 "directory (move the old one away first)")


def placements(layout: Layout, manifest: dict, secrets: dict[str, tuple[bytes, int]]
               ) -> list[tuple[str, Path]]:
    """(member or key file, where it goes) for every file a restore writes."""
    found = []
    for name in manifest["members"]:
        if name.startswith(backup.FILES_PREFIX):
            part, _, relative = name.removeprefix(backup.FILES_PREFIX).partition("/")
            if part not in layout.parts:
                raise backup.BackupRefused(f"the archive holds '{name}', outside the parts of "
                                           "a data directory")
            found.append((name, layout.parts[part] / relative))
    for name in secrets:
        part, _, relative = name.partition("/")
        found.append((name, layout.parts[part] / relative))
    if backup.ASYNC_MEMBER in manifest["members"]:
        found.append((backup.ASYNC_MEMBER, layout.async_store))
    return found


def to_place(placements: list[tuple[str, Path]], members: dict) -> list[tuple[str, Path]]:
    """The placements still to do: a file already there with the archive's bytes (the trusted
    key put back in DIR/keys/trusted) stays; anything else in the way is refused."""
    todo = []
    for name, target in placements:
        blocking = next((above for above in reversed(target.parents)
                         if os.path.lexists(above) and not above.is_dir()), None)
        if blocking is None and not os.path.lexists(target):
            todo.append((name, target))
            continue
        if blocking is None and name in members and target.is_file() and \
                artifacts.sha256_digest(target.read_bytes()) == members[name]["digest"]:
            continue
        raise FailedPrecondition(f"{blocking or target} is in the way of the archive's {name}: "
                                 "move it away (keep the trusted key outside the data "
                                 "directory, and give it with --trusted)")
    return todo


def place_files(staging: Path, todo: list[tuple[str, Path]], members: dict,
                secrets: dict[str, tuple[bytes, int]], placed: Placed) -> None:
    for name, target in todo:
        placed.file(target)
        if name in secrets:
            data, mode = secrets[name]
            write_atomic(target, data, mode & 0o600)  # never readable wider
        else:
            shutil.move(staging / name, target)
            os.chmod(target, 0o600 if name == backup.ASYNC_MEMBER else members[name]["mode"])


def restore_backup(archive: Path, layout: Layout, trusted: dict[str, Ed25519PublicKey], *,
                   kek: bytes | None = None, actor: str = "",
                   trusted_paths: set[Path] | None = None) -> RestoreResult:
    """Check `archive`, then restore it into `layout` (every destination empty but for
    `trusted_paths`, the trusted key files). On any failure, what it placed is taken back."""
    check_destination(layout, trusted_paths)
    placed = Placed()
    try:
        return restore_checked(archive, layout, trusted, kek, actor, placed)
    except BaseException:
        placed.undo()
        raise


def restore_checked(archive: Path, layout: Layout, trusted: dict[str, Ed25519PublicKey],
                    kek: bytes | None, actor: str, placed: Placed) -> RestoreResult:
    root = layout.data_dir or next(iter(layout.parts.values())).parent
    placed.mkdir(root)
    staging = Path(tempfile.mkdtemp(prefix=".meshserve-restore-", dir=root))
    try:
        digests = unpack(archive, staging)
        manifest = verified_manifest(staging, digests, trusted)
        tables = backup.parse_store((staging / backup.STORE_MEMBER).read_bytes())
        problems = backup.registry_problems(
            tables, repository_manifests(staging / backup.FILES_PREFIX / "models"))
        if problems:
            raise backup.BackupRefused("; ".join(problems))
        secrets = secret_files(manifest, staging, kek)
        todo = to_place(placements(layout, manifest, secrets), manifest["members"])
        placed.store(layout.store)
        with Store.open(layout.store) as store:
            if any(table.rows for table in store.export_tables().values()):
                raise FailedPrecondition(f"the store {store!r} already holds state: restore "
                                         "into an empty store")
            place_files(staging, todo, manifest["members"], secrets, placed)
            entries = store.restore_tables(
                tables, actor or default_actor(), "backup.restore", archive.name,
                after=json.dumps({"manifest_digest": digests[backup.MANIFEST],
                                  "recovery_point": manifest["recovery_point"],
                                  "created_at": manifest["created_at"]}, sort_keys=True))
        point = backup.manifest_point(manifest)
        problems = audit_log.verify(entries,
                                    anchor=point.audit_head if point.audit_seq else None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return RestoreResult(manifest, point, len(entries), entries[-1].hash if entries else "-",
                         problems, len(secrets))


def trusted_paths(args: argparse.Namespace) -> list[Path]:
    return args.trusted or [args.data_dir / "keys" / "trusted"]


def trusted_keys(args: argparse.Namespace) -> dict[str, Ed25519PublicKey]:
    paths = trusted_paths(args)
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise FailedPrecondition(f"no trusted key at {', '.join(missing)}: give --trusted, the "
                                 "public key of the registry's signing key (kept apart from "
                                 "the data directory)")
    return model_files.trusted_signers(paths)


def describe(result: RestoreResult, layout: Layout) -> str:
    manifest = result.manifest
    rows = sum(manifest["store"]["rows"].values())
    keys = manifest["keys"]
    keys_line = (f"{result.keys_restored} private key files decrypted" if result.keys_restored
                 else "not in the archive" if not keys else
                 "in the archive but not restored (no --kek-file)")
    left_out = manifest["secrets_left_out"]
    lines = [f"verified: {len(manifest['members'])} members, created {manifest['created_at']} "
             f"by {manifest['created_by']}",
             f"recovery point: {result.point.describe()}",
             f"restored: {rows} rows into {layout.store}; files into "
             f"{', '.join(str(p) for p in layout.parts.values())}",
             f"keys: {keys_line}"]
    if left_out and not keys:
        lines.append(f"put back from where you keep them: {', '.join(left_out)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    layout = Layout.from_args(args)
    try:
        kek = model_files.read_kek(args.kek_file) if args.kek_file else None
        result = restore_backup(args.archive, layout, trusted_keys(args), kek=kek,
                                actor=args.actor,
                                trusted_paths=trusted_files(trusted_paths(args)))
    except backup.BackupRefused as refused:
        print(f"refused: {refused.message}", file=sys.stderr)
        return 1
    except ServingError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    except OSError as error:  # a destination that cannot be written, say; taken back
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}; nothing was restored (what this "
              "restore had placed is removed)", file=sys.stderr)
        return 1
    print(describe(result, layout))
    return report(result.problems, result.entries, result.head)


def register(commands) -> None:
    parser = commands.add_parser("restore")
    parser.add_argument("archive", type=Path, help="the archive `meshserve backup` wrote")
    add_layout_flags(parser)
    parser.add_argument("--trusted", type=Path, action="append", default=None,
                        metavar="PEM|DIR",
                        help="public key(s) the archive must be signed by (repeatable; "
                             "default DIR/keys/trusted)")
    parser.add_argument("--kek-file", type=Path, default=None,
                        help="key-encryption key that opens the archive's keys")
    parser.set_defaults(func=run)
