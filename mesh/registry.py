"""The control plane's model registry: where pushed versions land.

A push of model M version V:

1. checks the name, version and size, and reads the input/output signature from the
   repository's `M/config.pbtxt` (or the config pushed with it, for a new model);
2. builds the manifest (digest of the plaintext, signature, who, when, source, notes) and,
   with `encrypt`, encrypts the artifact under a fresh data key wrapped by the KEK;
3. keeps the stored bytes (the ciphertext when encrypted: plaintext never reaches disk then)
   in the content-addressed store `REGISTRY/sha256/<hex of the stored bytes>`;
4. writes `M/V/` in the repository: the artifact, `manifest.sig`, then `manifest.json`,
   each atomically, in a directory that only appears, renamed, once complete;
5. records the row (and the audit entry "model.push") in the store.

Serving the new version is `meshserve traffic set` once a compute and a batcher run it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshserve.common import artifacts, model_files
from meshserve.common.errors import FailedPrecondition, InvalidArgument, NotFound
from meshserve.common.files import write_atomic
from meshserve.common.repository import (
    CONFIG_FILENAME,
    DEFAULT_MODEL_FILENAME,
    ENSEMBLE,
    kind_of,
    parse_config,
)
from meshserve.mesh.audit import utc_timestamp
from meshserve.mesh.store import Store
from meshserve.mesh.store_models import ModelVersion

MAX_ARTIFACT_BYTES = 64 * 1024 * 1024 - 64 * 1024  # one gRPC message, less room for metadata
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


@dataclass(frozen=True)
class Push:
    name: str
    version: str
    artifact: bytes
    source: str = ""
    notes: str = ""
    encrypt: bool = False
    config: str = ""


class Registry:
    def __init__(self, store: Store, repository: Path, content_store: Path,
                 signing_key: Ed25519PrivateKey, kek: bytes | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 random: artifacts.Random = os.urandom) -> None:
        self.store = store
        self.repository = repository
        self.content_store = content_store
        self._key = signing_key
        self._kek = kek
        self._clock = clock
        self._random = random
        self.signer = artifacts.key_id(signing_key.public_key())

    def push(self, push: Push, actor: str) -> ModelVersion:
        _check_name(push.name)
        if not push.version.isdigit() or push.version.startswith("0"):
            raise InvalidArgument(f"version must be a positive integer without leading zeros, "
                                  f"not '{push.version}'")
        if not push.artifact:
            raise InvalidArgument("artifact is empty")
        if len(push.artifact) > MAX_ARTIFACT_BYTES:
            raise InvalidArgument(f"artifact is {len(push.artifact)} bytes; a push carries at "
                                  f"most {MAX_ARTIFACT_BYTES} (one 64 MiB gRPC message)")
        if push.encrypt and self._kek is None:
            raise FailedPrecondition("cannot encrypt: this control plane has no key-encryption "
                                     "key (--kek-file or MESHSERVE_KEK_FILE)")
        model_dir = self.repository / push.name
        version_dir = model_dir / push.version
        if version_dir.exists():
            raise FailedPrecondition(f"model '{push.name}' version {push.version} already "
                                     f"exists in the repository ({version_dir})")
        if any(row.version == push.version for row in self.store.model_versions(push.name)):
            raise FailedPrecondition(f"model '{push.name}' version {push.version} is already "
                                     "in the registry; versions are immutable, push a new one")
        config = self._config(push, model_dir)
        if kind_of(config) is ENSEMBLE:
            raise FailedPrecondition(f"model '{push.name}' is an ensemble: it has no artifact "
                                     "to push (its config.pbtxt and an empty version "
                                     "directory are all it needs)")
        manifest = artifacts.build_manifest(
            model=push.name, version=push.version,
            artifact=config.default_model_filename or DEFAULT_MODEL_FILENAME,
            plaintext=push.artifact, inputs=model_files.tensor_signature(config.input),
            outputs=model_files.tensor_signature(config.output), pushed_by=actor,
            pushed_at=utc_timestamp(self._clock()), source=push.source, notes=push.notes)
        stored = push.artifact
        if push.encrypt:
            manifest, stored = artifacts.encrypt(manifest, push.artifact, self._kek,
                                                 self._random)
        self._keep(stored)
        self._write_version(model_dir, version_dir, manifest, stored, push.config)
        signed = artifacts.signed_payload(manifest).decode("utf-8")
        return self.store.add_model_version(push.name, push.version, manifest["digest"],
                                            self.signer, signed, actor)

    def versions(self, name: str = "") -> list[ModelVersion]:
        return self.store.model_versions(name)

    def show(self, name: str, version: str = "") -> ModelVersion:
        versions = self.store.model_versions(name)
        if not versions:
            raise NotFound(f"model '{name}' has no pushed version")
        if not version:
            return versions[-1]
        for row in versions:
            if row.version == version:
                return row
        raise NotFound(f"model '{name}' has no pushed version '{version}' (pushed: "
                       f"{', '.join(v.version for v in versions)})")

    def _config(self, push: Push, model_dir: Path):
        path = model_dir / CONFIG_FILENAME
        if path.is_file():
            if push.config and push.config != path.read_text("utf-8"):
                raise FailedPrecondition(f"model '{push.name}' exists with a different "
                                         f"{CONFIG_FILENAME}; push without a config")
            return parse_config(path.read_text("utf-8"), str(path), push.name)
        if not push.config:
            raise NotFound(f"model '{push.name}' is not in the repository; push its "
                           f"{CONFIG_FILENAME} with it (--config)")
        return parse_config(push.config, "the pushed config", push.name)

    def _keep(self, stored: bytes) -> Path:
        path = self.content_store / "sha256" / artifacts.sha256_digest(stored).split(":")[1]
        if not path.exists():
            write_atomic(path, stored, 0o444)
        return path

    def _write_version(self, model_dir: Path, version_dir: Path, manifest: dict,
                       stored: bytes, config: str) -> None:
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version_dir.name}.", dir=model_dir))
        try:
            model_files.write_version_files(staging, manifest, self._key,
                                            {artifacts.stored_filename(manifest): stored})
            os.chmod(staging, 0o755)
            os.rename(staging, version_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        config_path = model_dir / CONFIG_FILENAME
        if config and not config_path.exists():
            write_atomic(config_path, config.encode("utf-8"))


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or not set(name) <= _NAME_CHARS:
        raise InvalidArgument(f"model name '{name}' must be letters, digits, '_', '-' or '.', "
                              "not starting with '.'")
