"""What a backup archive holds and how it is checked: pure functions, no I/O.

An archive (an uncompressed tar) carries everything a mesh remembers:

- `store.json`: every table of the control plane's store (policies and their history,
  endpoints, canaries, the registry's rows, the audit log), read in one snapshot;
- `async.db`: the ingress's asynchronous store (a SQLite online backup);
- `files/<part>/...`: the model repository with its signed manifests, the registry's
  content-addressed artifacts, and the mesh's certificates, policy and public keys;
- `keys.tar.enc`, only when asked for: the private keys (files named `*.key`, and `kek`),
  as a tar encrypted under a key-encryption key with the registry's envelope scheme
  (`artifacts.encrypt`: AES-256-GCM under a random data key, wrapped by the KEK);
- `backup.json`, the manifest: format, when, by whom, the recovery point (the newest audit
  entry in the snapshot: anything recorded or submitted later is not in the archive), the
  digest, size and mode of every other member, and the keys' envelope;
- `backup.sig`: an Ed25519 signature of the manifest (`artifacts.sign`), by the registry's
  signing key.

A restore checks before it writes anything: the signature by a trusted key (a key of
another mesh is refused), then every member against the manifest (a flipped byte, a missing
or an unlisted member is refused with its name), then the registry's rows against the
manifests they name.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from meshserve.common import artifacts
from meshserve.common.errors import FailedPrecondition
from meshserve.mesh import audit as audit_log
from meshserve.mesh.database import TableRows
from meshserve.mesh.store import TABLES

FORMAT = "meshserve-backup/1"
MANIFEST = "backup.json"
SIGNATURE = "backup.sig"
STORE_MEMBER = "store.json"
ASYNC_MEMBER = "async.db"
KEYS_ARTIFACT = "keys.tar"
KEYS_MEMBER = KEYS_ARTIFACT + artifacts.ENCRYPTED_SUFFIX
FILES_PREFIX = "files/"
# The parts of a data directory carried as files (beside the two stores), each a directory.
PARTS = ("models", "registry", "tls", "auth", "keys")
SECRET_PATTERNS = ("*.key", "kek")
ARCHIVE_PREFIX = "meshserve-backup-"
ARCHIVE_SUFFIX = ".tar"
# What `archive_name` writes: only such archives are pruned, oldest first by this time.
ARCHIVE_NAME = re.compile(re.escape(ARCHIVE_PREFIX) + r"(\d{8}T\d{12}Z)" +
                          re.escape(ARCHIVE_SUFFIX))


class BackupRefused(FailedPrecondition):
    """An archive that must not be restored, and why."""


@dataclass(frozen=True)
class RecoveryPoint:
    """The newest audit entry in the snapshot: what the archive restores up to."""

    at: str
    audit_seq: int
    audit_head: str

    def describe(self) -> str:
        if not self.audit_seq:
            return f"{self.at} (empty audit log)"
        return f"{self.at}, audit entry {self.audit_seq} (head {self.audit_head[:12]}...)"


def is_secret(relative_path: str) -> bool:
    """A private key, left out of a backup unless asked for (and then encrypted)."""
    name = relative_path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in SECRET_PATTERNS)


def archive_name(created_at: str) -> str:
    """`meshserve-backup-20261203T101500123456Z.tar` for `2026-12-03T10:15:00.123456Z`."""
    stamp = created_at.replace("-", "").replace(":", "").replace(".", "")
    return f"{ARCHIVE_PREFIX}{stamp}{ARCHIVE_SUFFIX}"


def archive_stamp(name: str) -> str | None:
    """The time in a name `archive_name` wrote (`20261203T101500123456Z`); None for any other
    name, such as a hand-named `meshserve-backup-before-upgrade.tar`."""
    match = ARCHIVE_NAME.fullmatch(name)
    return match[1] if match else None


def to_prune(names: list[str], keep: int, written: str = "") -> list[str]:
    """The archives beyond the newest `keep`, oldest first, by the time in their names; names
    `archive_name` did not write are ignored, and `written` (the archive just written) is
    always kept, as one of the `keep`."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    others = sorted((name for name in names if name != written and archive_stamp(name)),
                    key=archive_stamp)
    return others[:max(0, len(others) - (keep - 1 if written else keep))]


# --------------------------------------------------------------------------- the store


def store_bytes(tables: Mapping[str, TableRows]) -> bytes:
    return artifacts.canonical_json({name: {"columns": list(table.columns),
                                            "rows": [list(row) for row in table.rows]}
                                     for name, table in tables.items()})


def parse_store(data: bytes) -> dict[str, TableRows]:
    try:
        raw = json.loads(data.decode("utf-8"))
        tables = {name: TableRows(tuple(table["columns"]), [tuple(row) for row in table["rows"]])
                  for name, table in raw.items()}
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise BackupRefused(f"{STORE_MEMBER} is not a store snapshot") from None
    unknown = sorted(set(tables) - set(TABLES))
    if unknown:
        raise BackupRefused(f"{STORE_MEMBER} holds tables this meshserve does not know: "
                            f"{', '.join(unknown)}")
    return tables


def recovery_point(tables: Mapping[str, TableRows], at: str) -> RecoveryPoint:
    audit = tables.get(audit_log.TABLE)
    if audit is None or not audit.rows:
        return RecoveryPoint(at, 0, audit_log.GENESIS)
    newest = audit_log.from_row(max(audit.rows, key=lambda row: int(row[0])))
    return RecoveryPoint(at, newest.seq, newest.hash)


def audit_entries(tables: Mapping[str, TableRows]) -> list[audit_log.AuditEntry]:
    audit = tables.get(audit_log.TABLE, TableRows((), []))
    return sorted((audit_log.from_row(row) for row in audit.rows), key=lambda e: e.seq)


# --------------------------------------------------------------------------- the manifest


def member(data: bytes, mode: int) -> dict[str, Any]:
    return {"digest": artifacts.sha256_digest(data), "size": len(data), "mode": mode & 0o777}


def build_manifest(*, created_at: str, created_by: str, point: RecoveryPoint,
                   store: Mapping[str, Any], submissions: Mapping[str, int] | None,
                   members: Mapping[str, Mapping[str, Any]], keys: Mapping[str, Any] | None,
                   secrets_left_out: list[str]) -> dict[str, Any]:
    """The manifest; `store` says the dialect, schema version and rows per table,
    `submissions` the asynchronous store's rows per state (None: there is none; {}: empty),
    `keys` the envelope of the encrypted keys (None: left out, and `secrets_left_out` says
    which)."""
    return {"format": FORMAT, "created_at": created_at, "created_by": created_by,
            "recovery_point": {"at": point.at, "audit_seq": point.audit_seq,
                               "audit_head": point.audit_head},
            "store": dict(store),
            "submissions": None if submissions is None else dict(submissions),
            "members": {name: dict(entry) for name, entry in sorted(members.items())},
            "keys": dict(keys) if keys else None,
            "secrets_left_out": sorted(secrets_left_out)}


def manifest_point(manifest: Mapping[str, Any]) -> RecoveryPoint:
    point = manifest["recovery_point"]
    return RecoveryPoint(point["at"], int(point["audit_seq"]), point["audit_head"])


def sign(manifest: Mapping[str, Any], key: Ed25519PrivateKey) -> bytes:
    """backup.sig: the registry's detached signature format, over the manifest."""
    return artifacts.sign(manifest, key)


def check(manifest_file: bytes, signature_file: bytes | None,
          digests: Mapping[str, str], trusted: Mapping[str, Ed25519PublicKey]) -> dict[str, Any]:
    """The manifest, once its signature is by a trusted key and `digests` (member name →
    sha256 digest of what the archive holds) match it exactly; BackupRefused otherwise."""
    if signature_file is None:
        raise BackupRefused(f"the archive has no {SIGNATURE}: it is not a signed backup")
    try:
        manifest = json.loads(manifest_file.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BackupRefused(f"{MANIFEST} is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupRefused(f"{MANIFEST} is not a {FORMAT} manifest")
    try:
        artifacts.verify_signature(manifest, signature_file, trusted)
    except artifacts.ArtifactRefused as refused:
        known = ", ".join(sorted(trusted)) or "none"
        raise BackupRefused(f"backup {refused.message.removeprefix('manifest ')}; the keys "
                            f"trusted here: {known} (an archive of another mesh is refused)"
                            ) from None
    listed = manifest.get("members") or {}
    for name, entry in sorted(listed.items()):
        if name not in digests:
            raise BackupRefused(f"the archive is incomplete: {name} is listed in its manifest "
                                "but missing")
        if digests[name] != entry["digest"]:
            raise BackupRefused(f"{name} was altered: digest {artifacts.short(digests[name])}, "
                                f"the manifest's {artifacts.short(entry['digest'])}")
    extra = sorted(set(digests) - set(listed))
    if extra:
        raise BackupRefused(f"the archive holds {extra[0]}, which its manifest does not list")
    return manifest


def registry_problems(tables: Mapping[str, TableRows],
                      manifests: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Registry rows whose version is not in the archive's model repository, or whose
    digest differs from that version's signed manifest (`manifests`: "model/version" →
    parsed manifest.json)."""
    table = tables.get("model_versions")
    if table is None:
        return []
    problems = []
    for row in table.rows:
        values = dict(zip(table.columns, row, strict=True))
        subject = f"{values['name']}/{values['version']}"
        manifest = manifests.get(subject)
        if manifest is None:
            problems.append(f"registry row {subject} has no version in the model repository")
        elif manifest.get("digest") != values["digest"]:
            problems.append(f"registry row {subject} has digest "
                            f"{artifacts.short(values['digest'])}, its manifest "
                            f"{artifacts.short(str(manifest.get('digest')))}")
    return problems


# --------------------------------------------------------------------------- the keys


def encrypt_keys(keys_tar: bytes, kek: bytes,
                 random: artifacts.Random = os.urandom) -> tuple[dict[str, Any], bytes]:
    """(the envelope for the manifest, the ciphertext): the registry's envelope scheme."""
    manifest = {"artifact": KEYS_ARTIFACT, "digest": artifacts.sha256_digest(keys_tar)}
    return artifacts.encrypt(manifest, keys_tar, kek, random)


def decrypt_keys(envelope: Mapping[str, Any], ciphertext: bytes, kek: bytes) -> bytes:
    try:
        return artifacts.decrypt(envelope, ciphertext, kek)
    except artifacts.ArtifactRefused as refused:
        raise BackupRefused(f"the archive's keys: {refused.message}") from None
