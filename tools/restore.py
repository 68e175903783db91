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
chain is verified, anchored at the archive's recovery point.
"""

from __future__ import annotations

import argparse
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

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from meshserve.common import artifacts, model_files
from meshserve.common.errors import FailedPrecondition, ServingError
from meshserve.common.files import write_atomic
from meshserve.mesh import backup
from meshserve.mesh.database import SCHEMA_VERSION
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
        with tarfile.open(archive, "r:") as tar:
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
    except FileNotFoundError:
        raise backup.BackupRefused(f"no archive at {archive}") from None
    return digests


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


def check_destination(layout: Layout, manifest: dict) -> None:
    for part, directory in layout.parts.items():
        if directory.exists() and any(directory.iterdir()):
            raise FailedPrecondition(f"{directory} ({part}) is not empty: restore into an "
                                     "empty data directory (move the old one away first)")
    if manifest["submissions"] is not None and layout.async_store.exists():
        raise FailedPrecondition(f"{layout.async_store} exists: restore into an empty data "
                                 "directory (move the old one away first)")


def place_files(staging: Path, layout: Layout, manifest: dict,
                secrets: dict[str, tuple[bytes, int]]) -> None:
    for name, entry in manifest["members"].items():
        if not name.startswith(backup.FILES_PREFIX):
            continue
        part, _, relative = name.removeprefix(backup.FILES_PREFIX).partition("/")
        if part not in layout.parts:
            raise backup.BackupRefused(f"the archive holds '{name}', outside the parts of a "
                                       "data directory")
        move(staging / name, layout.parts[part] / relative, entry["mode"])
    for name, (data, mode) in secrets.items():
        part, _, relative = name.partition("/")
        write_atomic(layout.parts[part] / relative, data, mode & 0o600)  # never readable wider
    if manifest["submissions"] is not None:
        move(staging / backup.ASYNC_MEMBER, layout.async_store, 0o600)


def move(source: Path, target: Path, mode: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(source, target)
    os.chmod(target, mode)


def restore_backup(archive: Path, layout: Layout, trusted: dict[str, Ed25519PublicKey], *,
                   kek: bytes | None = None, actor: str = "") -> RestoreResult:
    """Check `archive`, then restore it into `layout` (every destination empty)."""
    first = next(iter(layout.parts.values()))
    first.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".meshserve-restore-", dir=first.parent))
    try:
        digests = unpack(archive, staging)
        manifest = verified_manifest(staging, digests, trusted)
        tables = backup.parse_store((staging / backup.STORE_MEMBER).read_bytes())
        problems = backup.registry_problems(
            tables, repository_manifests(staging / backup.FILES_PREFIX / "models"))
        if problems:
            raise backup.BackupRefused("; ".join(problems))
        secrets = secret_files(manifest, staging, kek)
        check_destination(layout, manifest)
        with Store.open(layout.store) as store:
            if any(table.rows for table in store.export_tables().values()):
                raise FailedPrecondition(f"the store {store!r} already holds state: restore "
                                         "into an empty store")
            place_files(staging, layout, manifest, secrets)
            store.import_tables(tables)
            point = backup.manifest_point(manifest)
            store.append_audit(actor or default_actor(), "backup.restore", archive.name,
                               after=json.dumps({
                                   "manifest_digest": digests[backup.MANIFEST],
                                   "recovery_point": manifest["recovery_point"],
                                   "created_at": manifest["created_at"]}, sort_keys=True))
            entries = store.audit()
            anchor = point.audit_head if point.audit_seq else None
            problems = store.verify_audit(anchor=anchor)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return RestoreResult(manifest, point, len(entries), entries[-1].hash if entries else "-",
                         problems, len(secrets))


def trusted_keys(args: argparse.Namespace) -> dict[str, Ed25519PublicKey]:
    paths = args.trusted or [args.data_dir / "keys" / "trusted"]
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
                                actor=args.actor)
    except backup.BackupRefused as refused:
        print(f"refused: {refused.message}", file=sys.stderr)
        return 1
    except ServingError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
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
