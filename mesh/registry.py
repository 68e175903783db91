"""The control plane's model registry: where pushed versions land.

A push of model M version V:

1. checks the request's fields (name, version, sizes, text), reads the input/output
   signature from the repository's `M/config.pbtxt` (or the config pushed with it, for a new
   model), and checks that the artifact is a model of the kind that config declares
   (`meshserve.common.model_check`, the check `meshserve models push` makes too): a field
   that is not what it must be is INVALID_ARGUMENT naming it, and nothing is stored;
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

from meshserve.common import artifacts, model_check, model_files
from meshserve.common.errors import FailedPrecondition, InvalidArgument, NotFound, ServingError
from meshserve.common.files import write_atomic
from meshserve.common.model_check import MAX_ARTIFACT_BYTES
from meshserve.common.repository import (
    CONFIG_FILENAME,
    ENSEMBLE,
    artifact_filename,
    is_control,
    kind_of,
    parse_config,
)
from meshserve.mesh.audit import utc_timestamp
from meshserve.mesh.store import Store
from meshserve.mesh.store_models import ModelVersion

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
MAX_NAME_CHARS = 255  # the model's directory name
MAX_VERSION = 2**63 - 1  # a version number is an int64, as in Triton
MAX_CONFIG_BYTES = 1024 * 1024
MAX_SOURCE_CHARS = 2048
MAX_NOTES_CHARS = 16 * 1024


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
        check_request(push)
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
        if refusal := artifact_refusal(push.name, config, push.artifact):
            raise InvalidArgument(refusal)
        manifest = artifacts.build_manifest(
            model=push.name, version=push.version, artifact=artifact_filename(config),
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
        """The model's config: the repository's (a problem with it is the repository's:
        FAILED_PRECONDITION), else the pushed one (INVALID_ARGUMENT naming `config`)."""
        path = model_dir / CONFIG_FILENAME
        if path.is_file():
            if push.config and push.config != path.read_text("utf-8"):
                raise FailedPrecondition(f"model '{push.name}' exists with a different "
                                         f"{CONFIG_FILENAME}; push without a config")
            try:
                return parse_config(path.read_text("utf-8"), str(path), push.name)
            except ServingError as error:
                raise FailedPrecondition(error.message) from None
        if not push.config:
            raise NotFound(f"model '{push.name}' is not in the repository; push its "
                           f"{CONFIG_FILENAME} with it (--config)")
        try:
            return parse_config(push.config, "config", push.name)
        except ServingError as error:
            raise InvalidArgument(error.message) from None

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


def check_request(push: Push) -> None:
    """INVALID_ARGUMENT naming the first field of `push` that is not what a push carries."""
    refusal = (name_refusal(push.name) or version_refusal(push.version) or size_refusal(push)
               or text_refusal("source", push.source, MAX_SOURCE_CHARS)
               or text_refusal("notes", push.notes, MAX_NOTES_CHARS, allowed="\n\t"))
    if refusal:
        raise InvalidArgument(refusal)


def name_refusal(name: str) -> str | None:
    if len(name) > MAX_NAME_CHARS:
        return f"model name is {len(name)} characters; at most {MAX_NAME_CHARS}"
    if not name or name.startswith(".") or not set(name) <= _NAME_CHARS:
        return (f"model name {name!r} must be letters, digits, '_', '-' or '.', not starting "
                "with '.'")
    return None


def version_refusal(version: str) -> str | None:
    if not model_files.is_version_name(version) or len(version) > len(str(MAX_VERSION)) or \
            int(version) > MAX_VERSION:
        shown = version if len(version) <= 40 else version[:40] + "..."
        return (f"version must be a positive integer without leading zeros, at most "
                f"{MAX_VERSION}, not {shown!r}")
    return None


def size_refusal(push: Push) -> str | None:
    if not push.artifact:
        return "artifact is empty"
    if len(push.artifact) > MAX_ARTIFACT_BYTES:
        return (f"artifact is {len(push.artifact)} bytes; a push carries at most "
                f"{MAX_ARTIFACT_BYTES} (one 64 MiB gRPC message)")
    size = len(push.config.encode("utf-8"))
    if size > MAX_CONFIG_BYTES:
        return f"config is {size} bytes; a {CONFIG_FILENAME} has at most {MAX_CONFIG_BYTES}"
    return None


def text_refusal(field: str, text: str, limit: int, allowed: str = "") -> str | None:
    """Why `text` cannot be the manifest's `field`: too long, or holding control characters
    (other than `allowed`) that would rewrite an operator's terminal in `models show`."""
    if len(text) > limit:
        return f"{field} is {len(text)} characters; at most {limit}"
    control = next((c for c in text if is_control(c) and c not in allowed), None)
    if control is not None:
        return f"{field} holds the control character {control!r}; {field} is plain text"
    return None


def artifact_refusal(name: str, config, artifact: bytes) -> str | None:
    """Why `artifact` is not a model of the kind model `name`'s config declares, or None."""
    kind = kind_of(config)
    refusal = model_check.refusal(kind, artifact, "artifact")
    if refusal is None:
        return None
    declared = (f'platform "{config.platform}"' if config.platform else
                f'backend "{config.backend}"')
    return (f"{refusal}; model '{name}' is declared {model_check.LABELS[kind]} ({declared} "
            f"in its {CONFIG_FILENAME})")
