"""Fetching a version as stored, and checking what was fetched, on a temporary directory."""

import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from meshserve.common import artifacts, keys, model_files
from meshserve.common.artifacts import ArtifactRefused
from meshserve.common.errors import FailedPrecondition, InvalidArgument, NotFound
from meshserve.mesh.fetch import read_version, signed_versions, verify_fetched
from meshserve.mesh.registry import Push, Registry
from meshserve.mesh.store import Store
from tests.torchscript_models import torchscript_shaped
from tests.unit.test_registry import tiny_repository

PLAIN = torchscript_shaped(b"torchscript stand-in " * 64)
OTHER = torchscript_shaped(b"another stand-in " * 64)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    tiny_repository(tmp_path, b"unsigned v1")
    key = model_files.signing_key(tmp_path / "keys" / "signing.key")
    rng = random.Random(7)
    with Store.open(tmp_path / "mesh.db") as store:
        registry = Registry(store, tmp_path / "models", tmp_path / "registry", key,
                            model_files.read_kek(tmp_path / "keys" / "kek"),
                            clock=lambda: datetime(2026, 5, 1, tzinfo=UTC),
                            random=rng.randbytes)
        registry.push(Push("tiny", "2", PLAIN), "client/developer")
        registry.push(Push("tiny", "10", OTHER, encrypt=True), "client/developer")
    return tmp_path


def test_only_signed_versions_in_number_order(data: Path) -> None:
    assert signed_versions(data / "models", "tiny") == ["2", "10"]
    assert signed_versions(data / "models", "absent") == []


def test_a_plain_version_is_handed_out_as_stored(data: Path) -> None:
    fetched = read_version(data / "models", "tiny", "2")
    stored = data / "models" / "tiny" / "2"
    assert fetched.artifact == PLAIN == (stored / "model.pt").read_bytes()
    assert fetched.manifest == (stored / "manifest.json").read_bytes()
    assert fetched.signature == (stored / "manifest.sig").read_bytes()
    assert (fetched.digest, fetched.filename, fetched.encrypted) == \
        (artifacts.sha256_digest(PLAIN), "model.pt", False)
    signer = verify_fetched(fetched.manifest, fetched.signature, fetched.artifact,
                            [data / "keys" / "trusted"])
    assert signer.startswith("ed25519:")


def test_the_latest_is_encrypted_and_stays_encrypted(data: Path) -> None:
    fetched = read_version(data / "models", "tiny")
    assert (fetched.version, fetched.filename, fetched.encrypted) == ("10", "model.pt.enc", True)
    assert b"another stand-in " * 4 not in fetched.artifact
    assert fetched.digest == artifacts.sha256_digest(OTHER)
    trusted = [data / "keys" / "trusted"]
    verify_fetched(fetched.manifest, fetched.signature, fetched.artifact, trusted)
    kek = model_files.read_kek(data / "keys" / "kek")
    verify_fetched(fetched.manifest, fetched.signature, fetched.artifact, trusted, kek)
    with pytest.raises(ArtifactRefused, match="encrypted artifact digest"):
        verify_fetched(fetched.manifest, fetched.signature, fetched.artifact + b"x", trusted)


@pytest.mark.parametrize(("name", "version", "error", "message"), [
    ("tiny", "3", NotFound, "model 'tiny' has no signed version '3' (signed: 2, 10)"),
    ("tiny", "1", NotFound, "model 'tiny' has no signed version '1' (signed: 2, 10)"),
    ("absent", "", NotFound, "model 'absent' has no signed version in the repository"),
    ("../keys", "", InvalidArgument, "model name '../keys' must be letters, digits"),
    ("tiny", "../2", InvalidArgument, "version must be a number, not '../2'"),
])
def test_refusals_name_the_problem(data: Path, name, version, error, message) -> None:
    with pytest.raises(error) as raised:
        read_version(data / "models", name, version)
    assert raised.value.message.startswith(message)


def test_a_tampered_artifact_or_a_stranger_key_fails_the_check(data: Path,
                                                               tmp_path: Path) -> None:
    fetched = read_version(data / "models", "tiny", "2")
    trusted = [data / "keys" / "trusted"]
    with pytest.raises(ArtifactRefused, match="artifact digest .* does not match"):
        verify_fetched(fetched.manifest, fetched.signature, fetched.artifact[:-1], trusted)
    stranger = tmp_path / "stranger.pub"
    stranger.write_bytes(keys.public_key_pem(
        model_files.signing_key(tmp_path / "other.key", create=True).public_key()))
    with pytest.raises(ArtifactRefused, match="unknown key"):
        verify_fetched(fetched.manifest, fetched.signature, fetched.artifact, [stranger])


def test_a_version_missing_its_signature_is_not_handed_out(data: Path) -> None:
    (data / "models" / "tiny" / "2" / "manifest.sig").unlink()
    with pytest.raises(FailedPrecondition, match="tiny/2: manifest.sig is missing"):
        read_version(data / "models", "tiny", "2")
