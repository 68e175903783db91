"""Fetching a model version out of the repository, as stored.

The files of `REPOSITORY/M/V/` are handed out as they are on disk: the stored artifact (the
ciphertext when the version is encrypted: fetching never decrypts), `manifest.json` and
`manifest.sig`. The taker checks the signature and digest with the trusted keys it holds
(`meshserve models fetch --trusted`). Only signed versions are handed out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from meshserve.common import artifacts, model_files
from meshserve.common.artifacts import MANIFEST_FILENAME, SIGNATURE_FILENAME, ArtifactRefused
from meshserve.common.errors import FailedPrecondition, InvalidArgument, NotFound

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


@dataclass(frozen=True)
class Fetched:
    name: str
    version: str
    artifact: bytes  # as stored
    manifest: bytes  # manifest.json as written
    signature: bytes  # manifest.sig
    digest: str  # sha256 of the plaintext, from the manifest
    filename: str  # the stored file's name (`model.pt` or `model.pt.enc`)

    @property
    def encrypted(self) -> bool:
        return self.filename.endswith(artifacts.ENCRYPTED_SUFFIX)


def check_ref(name: str, version: str) -> None:
    if not name or name.startswith(".") or not set(name) <= _NAME_CHARS:
        raise InvalidArgument(f"model name '{name}' must be letters, digits, '_', '-' or '.', "
                              "not starting with '.'")
    if version and not version.isdigit():
        raise InvalidArgument(f"version must be a number, not '{version}'")


def signed_versions(repository: Path, name: str) -> list[str]:
    """The versions of `name` that have a manifest, in number order."""
    model_dir = repository / name
    if not model_dir.is_dir():
        return []
    found = [p.name for p in model_dir.iterdir()
             if p.is_dir() and p.name.isdigit() and (p / MANIFEST_FILENAME).is_file()]
    return sorted(found, key=int)


def read_version(repository: Path, name: str, version: str = "") -> Fetched:
    """The stored files of `name` `version` (the highest signed version when empty)."""
    check_ref(name, version)
    versions = signed_versions(repository, name)
    if not versions:
        raise NotFound(f"model '{name}' has no signed version in the repository")
    version = version or versions[-1]
    if version not in versions:
        raise NotFound(f"model '{name}' has no signed version '{version}' (signed: "
                       f"{', '.join(versions)})")
    version_dir = repository / name / version
    manifest_file = (version_dir / MANIFEST_FILENAME).read_bytes()
    try:
        manifest = artifacts.parse_manifest(manifest_file)
    except ArtifactRefused as error:
        raise FailedPrecondition(f"{name}/{version}: {error.message}") from None
    stored = version_dir / artifacts.stored_filename(manifest)
    signature = version_dir / SIGNATURE_FILENAME
    for path in (stored, signature):
        if not path.is_file():
            raise FailedPrecondition(f"{name}/{version}: {path.name} is missing")
    return Fetched(name, version, stored.read_bytes(), manifest_file, signature.read_bytes(),
                   str(manifest["digest"]), stored.name)


def verify_fetched(manifest_file: bytes, signature_file: bytes, stored: bytes,
                   trusted_paths: list[Path], kek: bytes | None = None) -> str:
    """The signer's key id when a trusted key signed the manifest and the stored bytes match
    its digest (the ciphertext digest for an encrypted artifact without `kek`);
    ArtifactRefused or FailedPrecondition otherwise."""
    trusted = model_files.trusted_signers(trusted_paths)
    manifest = artifacts.parse_manifest(manifest_file)
    signer = artifacts.verify_signature(manifest, signature_file, trusted)
    encryption = manifest.get("encryption")
    if encryption and kek is None:
        artifacts.check_digest(encryption["ciphertext_digest"], stored, "encrypted artifact")
    else:
        artifacts.open_artifact(manifest_file, None, stored, None, kek)
    return signer
