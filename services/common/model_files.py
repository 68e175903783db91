"""The files behind `meshserve.common.artifacts`: keys, KEKs and version directories.

Keys of a data directory (`meshserve up` creates them; never in the repository):

    DIR/keys/signing.key         Ed25519 private key (PEM, mode 0600) that signs manifests
    DIR/keys/trusted/*.pub       public keys of trusted signers (PEM)
    DIR/keys/kek                 a key-encryption key (32 random bytes, mode 0600)

A trusted-signers path is one PEM file (one or more keys) or a directory of `*.pub` files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from meshserve.common import artifacts, keys
from meshserve.common.artifacts import MANIFEST_FILENAME, SIGNATURE_FILENAME, ArtifactRefused
from meshserve.common.errors import FailedPrecondition
from meshserve.common.files import write_atomic

KEK_ENV = "MESHSERVE_KEK_FILE"


def signing_key(path: Path, create: bool = False) -> Ed25519PrivateKey:
    """The signing key at `path`, generated (mode 0600) when missing and `create`."""
    if not path.exists():
        if not create:
            raise FailedPrecondition(f"no signing key at {path}")
        write_atomic(path, keys.private_key_pem(Ed25519PrivateKey.generate()), 0o600)
    return artifacts.load_private_key(path.read_bytes(), str(path))


def trust(key: Ed25519PrivateKey, trusted_dir: Path) -> Path:
    """Add the key's public half to `trusted_dir` (as `<key id>.pub`)."""
    public = key.public_key()
    path = trusted_dir / (artifacts.key_id(public).replace(":", "-") + ".pub")
    if not path.exists():
        write_atomic(path, keys.public_key_pem(public))
    return path


def trusted_signers(paths: list[Path] | Path) -> dict[str, Ed25519PublicKey]:
    """Keys by key id from PEM files and directories of `*.pub` files."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in [paths] if isinstance(paths, Path) else paths:
        files = sorted(path.glob("*.pub")) if path.is_dir() else [path]
        if not path.exists():
            raise FailedPrecondition(f"trusted signers: {path} does not exist")
        for file in files:
            keys.update(artifacts.load_public_keys(file.read_bytes(), str(file)))
    return keys


def read_kek(path: Path) -> bytes:
    try:
        return artifacts.parse_kek(path.read_bytes(), str(path))
    except OSError as error:
        raise FailedPrecondition(f"cannot read the key-encryption key {path}: "
                                 f"{error.strerror}") from None


def kek_path(flag: Path | None, environ: dict[str, str]) -> Path | None:
    """`--kek-file`, else `MESHSERVE_KEK_FILE`, else none."""
    if flag is not None:
        return flag
    return Path(environ[KEK_ENV]) if environ.get(KEK_ENV) else None


def ensure_kek(path: Path) -> bytes:
    """The KEK at `path`, generated (32 random bytes, mode 0600) when missing."""
    if not path.exists():
        write_atomic(path, artifacts.new_kek(), 0o600)
    return read_kek(path)


def load_version(version_dir: Path, artifact_name: str,
                 trusted: dict[str, Ed25519PublicKey] | None, kek: bytes | None,
                 require_signed: bool) -> tuple[bytes | Path, dict[str, Any] | None, str]:
    """What to load from a version directory, checked: (plaintext bytes, manifest, signer)
    for a version with a manifest; (the artifact's path, None, "") for one without, unless
    `require_signed`. ArtifactRefused says why a version must not be loaded."""
    manifest_path = version_dir / MANIFEST_FILENAME
    if not manifest_path.is_file():
        path = version_dir / artifact_name
        if not path.is_file():
            raise FailedPrecondition(f"no model file {path}")
        if require_signed:
            raise ArtifactRefused(f"{manifest_path} is missing and signed artifacts are "
                                  "required (--require-signed)")
        return path, None, ""
    manifest = artifacts.parse_manifest(manifest_path.read_bytes())
    signature = version_dir / SIGNATURE_FILENAME
    stored = version_dir / artifacts.stored_filename(manifest)
    if not stored.is_file():
        raise ArtifactRefused(f"the manifest names {stored.name}, which is missing")
    manifest, signer, plaintext = artifacts.open_artifact(
        manifest_path.read_bytes(), signature.read_bytes() if signature.is_file() else None,
        stored.read_bytes(), trusted, kek)
    return plaintext, manifest, signer


def manifest_summary(version_dir: Path) -> tuple[str, str] | None:
    """(digest, signer key id) from a version directory's manifest and signature, unchecked
    (for display); None when it has no readable manifest."""
    try:
        manifest = json.loads((version_dir / MANIFEST_FILENAME).read_text("utf-8"))
        signature = json.loads((version_dir / SIGNATURE_FILENAME).read_text("utf-8"))
        return str(manifest["digest"]), str(signature["key_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


_VERSION_NAME = re.compile(r"[1-9][0-9]*", re.ASCII)


def is_version_name(name: str) -> bool:
    """Whether a directory name is a version: a positive integer without leading zeros (the
    one rule of the repository loader and the signer)."""
    return _VERSION_NAME.fullmatch(name) is not None


def version_dirs(repository: Path) -> Iterator[tuple[str, str, Path]]:
    """(model, version, directory) of every version directory, sorted."""
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir()):
        versions = [p for p in model_dir.iterdir() if p.is_dir() and is_version_name(p.name)]
        for version_dir in sorted(versions, key=lambda p: int(p.name)):
            yield model_dir.name, version_dir.name, version_dir


def tensor_signature(tensors) -> list[dict]:
    """A config's inputs or outputs as manifest entries."""
    from meshserve.common.datatypes import WIRE_FROM_CONFIG

    return [{"name": t.name, "datatype": WIRE_FROM_CONFIG.get(t.data_type, str(t.data_type)),
             "dims": list(t.dims)} for t in tensors]


def sign_version(version_dir: Path, config, key: Ed25519PrivateKey, *, pushed_by: str,
                 pushed_at: str, source: str, notes: str = "") -> dict[str, Any]:
    """Write manifest.json and manifest.sig for the plain artifact already in `version_dir`."""
    artifact = config.default_model_filename or "model.pt"
    manifest = artifacts.build_manifest(
        model=config.name, version=version_dir.name, artifact=artifact,
        plaintext=(version_dir / artifact).read_bytes(),
        inputs=tensor_signature(config.input), outputs=tensor_signature(config.output),
        pushed_by=pushed_by, pushed_at=pushed_at, source=source, notes=notes)
    write_version_files(version_dir, manifest, key, {})
    return manifest


def write_version_files(version_dir: Path, manifest: dict[str, Any], key: Ed25519PrivateKey,
                        files: dict[str, bytes]) -> None:
    """The artifact file(s) first, then the manifest and its signature, each atomically."""
    for name, data in files.items():
        write_atomic(version_dir / name, data)
    write_atomic(version_dir / SIGNATURE_FILENAME, artifacts.sign(manifest, key))
    write_atomic(version_dir / MANIFEST_FILENAME, artifacts.manifest_bytes(manifest))


def verify_repository(repository: Path, trusted: dict[str, Ed25519PublicKey],
                      kek: bytes | None,
                      on_version: Callable[[str, str], None] | None = None,
                      without_artifact: frozenset[str] = frozenset()) -> list[str]:
    """One line per problem in a repository: each version's signature and digests. Without
    a KEK, an encrypted artifact's ciphertext digest (signed) is what is checked. Models in
    `without_artifact` (ensembles) have nothing to verify."""
    problems = []
    for model, version, version_dir in version_dirs(repository):
        if model in without_artifact:
            continue
        if on_version is not None:
            on_version(model, version)
        where = f"{model}/{version}"
        manifest_path = version_dir / MANIFEST_FILENAME
        if not manifest_path.is_file():
            problems.append(f"{where}: unsigned (no {MANIFEST_FILENAME})")
            continue
        try:
            manifest = artifacts.parse_manifest(manifest_path.read_bytes())
            signature = version_dir / SIGNATURE_FILENAME
            if not signature.is_file():
                raise ArtifactRefused(f"{SIGNATURE_FILENAME} is missing")
            artifacts.verify_signature(manifest, signature.read_bytes(), trusted)
            stored = version_dir / artifacts.stored_filename(manifest)
            if not stored.is_file():
                raise ArtifactRefused(f"the manifest names {stored.name}, which is missing")
            data = stored.read_bytes()
            if manifest.get("encryption") and kek is None:
                artifacts.check_digest(manifest["encryption"]["ciphertext_digest"], data,
                                       "encrypted artifact")
            else:
                artifacts.open_artifact(manifest_path.read_bytes(), None, data, None, kek)
        except ArtifactRefused as error:
            problems.append(f"{where}: {error.message}")
    return problems
