import json
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshserve.common import artifacts, keys
from meshserve.common.artifacts import ArtifactRefused
from meshserve.common.errors import InvalidArgument

PLAIN = b"torchscript bytes " * 100
KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
TRUSTED = {artifacts.key_id(KEY.public_key()): KEY.public_key()}
KEK = bytes(range(32))
NEW_KEK = bytes(range(32, 64))


def seeded(seed: int = 7):
    rng = random.Random(seed)
    return lambda n: rng.randbytes(n)


def manifest(plain: bytes = PLAIN) -> dict:
    return artifacts.build_manifest(
        model="mlp", version="3", artifact="model.pt", plaintext=plain,
        inputs=[{"name": "INPUT__0", "datatype": "FP32", "dims": [256]}],
        outputs=[{"name": "OUTPUT__0", "datatype": "FP32", "dims": [10]}],
        pushed_by="client/developer", pushed_at="2026-01-01T00:00:00.000000Z",
        source="git:abc123", notes="accuracy 0.97")


def test_sign_and_verify() -> None:
    m = manifest()
    signer = artifacts.verify_signature(m, artifacts.sign(m, KEY), TRUSTED)
    assert signer == artifacts.key_id(KEY.public_key())
    assert signer.startswith("ed25519:") and len(signer) == len("ed25519:") + 16
    opened, who, plain = artifacts.open_artifact(artifacts.manifest_bytes(m),
                                                 artifacts.sign(m, KEY), PLAIN, TRUSTED, None)
    assert (opened, who, plain) == (m, signer, PLAIN)


def test_canonical_json_ignores_layout_and_key_order() -> None:
    assert artifacts.canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()
    m = manifest()
    reparsed = json.loads(artifacts.manifest_bytes(m))
    assert artifacts.signed_payload(reparsed) == artifacts.signed_payload(m)


def flipped(data: bytes, at: int = 5) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


@pytest.mark.parametrize("case, change, message", [
    ("flipped artifact byte", lambda m, s, a: (m, s, flipped(a)),
     r"^artifact digest sha256:[0-9a-f]{12}\.\. does not match the manifest's "
     r"sha256:[0-9a-f]{12}\.\.$"),
    ("unknown signer", lambda m, s, a: (m, artifacts.sign(m, OTHER), a),
     r"^manifest signed by an unknown key \(key id ed25519:[0-9a-f]{16}\)$"),
    ("manifest digest edited", lambda m, s, a: ({**m, "digest": artifacts.sha256_digest(b"x")},
                                                s, a),
     r"^manifest signature does not verify with key ed25519:[0-9a-f]{16}: the manifest was "
     r"changed after signing$"),
    ("notes edited", lambda m, s, a: ({**m, "notes": "accuracy 0.99"}, s, a),
     "does not verify"),
    ("garbage signature", lambda m, s, a: (m, b"{}", a), "^manifest signature file is malformed$"),
    ("no signature", lambda m, s, a: (m, None, a), "^manifest.sig is missing$"),
])
def test_tampering_is_refused(case, change, message) -> None:
    m = manifest()
    m2, sig, stored = change(m, artifacts.sign(m, KEY), PLAIN)
    with pytest.raises(ArtifactRefused, match=message) as caught:
        artifacts.open_artifact(artifacts.manifest_bytes(m2), sig, stored, TRUSTED, None)
    assert caught.value.code == "FAILED_PRECONDITION"


def test_not_a_manifest() -> None:
    with pytest.raises(ArtifactRefused, match="not JSON"):
        artifacts.parse_manifest(b"{")
    with pytest.raises(ArtifactRefused, match="not a meshserve-manifest/1 manifest"):
        artifacts.parse_manifest(b"{}")
    with pytest.raises(ArtifactRefused, match="no 'digest'"):
        artifacts.parse_manifest(json.dumps({"format": artifacts.FORMAT, "model": "m",
                                             "version": "1", "artifact": "a"}).encode())


def test_encrypt_then_decrypt_equals_plain() -> None:
    m, ciphertext = artifacts.encrypt(manifest(), PLAIN, KEK, seeded())
    assert ciphertext != PLAIN and PLAIN[:16] not in ciphertext
    assert m["encryption"]["file"] == "model.pt.enc"
    assert m["encryption"]["ciphertext_digest"] == artifacts.sha256_digest(ciphertext)
    assert m["wrapped_key"]["kek_id"] == artifacts.kek_id(KEK)
    assert artifacts.decrypt(m, ciphertext, KEK) == PLAIN
    sig = artifacts.sign(m, KEY)
    _, _, plain = artifacts.open_artifact(artifacts.manifest_bytes(m), sig, ciphertext,
                                          TRUSTED, KEK)
    assert plain == PLAIN


def test_encryption_is_randomized_per_artifact() -> None:
    _, first = artifacts.encrypt(manifest(), PLAIN, KEK, seeded(1))
    _, second = artifacts.encrypt(manifest(), PLAIN, KEK, seeded(2))
    assert first != second


@pytest.mark.parametrize("kek, message", [
    (NEW_KEK, r"^the data key is wrapped by key-encryption key kek:[0-9a-f]{16}, not by the "
              r"one given \(kek:[0-9a-f]{16}\)$"),
    (None, r"^the artifact is encrypted \(key-encryption key kek:[0-9a-f]{16}\) and no "
           r"key-encryption key was given \(--kek-file or MESHSERVE_KEK_FILE\)$"),
])
def test_wrong_or_missing_kek_is_refused(kek, message) -> None:
    m, ciphertext = artifacts.encrypt(manifest(), PLAIN, KEK, seeded())
    with pytest.raises(ArtifactRefused, match=message):
        artifacts.open_artifact(artifacts.manifest_bytes(m), artifacts.sign(m, KEY), ciphertext,
                                TRUSTED, kek)


def test_wrapped_key_edited_does_not_unwrap() -> None:
    m, ciphertext = artifacts.encrypt(manifest(), PLAIN, KEK, seeded())
    wrapped = dict(m["wrapped_key"], key=artifacts._b64(flipped(
        artifacts._unb64(m["wrapped_key"]["key"]), 0)))
    with pytest.raises(ArtifactRefused, match="does not unwrap"):
        artifacts.decrypt({**m, "wrapped_key": wrapped}, ciphertext, KEK)


def test_flipped_ciphertext_byte_is_refused_before_decrypting() -> None:
    m, ciphertext = artifacts.encrypt(manifest(), PLAIN, KEK, seeded())
    with pytest.raises(ArtifactRefused, match="^encrypted artifact digest .* does not match"):
        artifacts.decrypt(m, flipped(ciphertext), KEK)


def test_rewrap_keeps_ciphertext_and_only_the_new_kek_decrypts() -> None:
    m, ciphertext = artifacts.encrypt(manifest(), PLAIN, KEK, seeded())
    sig = artifacts.sign(m, KEY)
    rewrapped = artifacts.rewrap(m, KEK, NEW_KEK, seeded(3))
    assert rewrapped["encryption"] == m["encryption"]
    assert rewrapped["wrapped_key"]["kek_id"] == artifacts.kek_id(NEW_KEK)
    assert artifacts.decrypt(rewrapped, ciphertext, NEW_KEK) == PLAIN
    with pytest.raises(ArtifactRefused, match="wrapped by key-encryption key"):
        artifacts.decrypt(rewrapped, ciphertext, KEK)
    # The signature does not cover the wrapped key: still valid after re-wrapping.
    artifacts.verify_signature(rewrapped, sig, TRUSTED)
    with pytest.raises(ArtifactRefused, match="wrapped by key-encryption key"):
        artifacts.rewrap(m, NEW_KEK, KEK)


@pytest.mark.parametrize("text, ok", [
    (bytes(range(32)), True),
    (bytes(range(32)).hex().encode() + b"\n", True),
    (b"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n", True),
    (b"short", False),
    (b"zz" * 32, False),
])
def test_parse_kek(text, ok) -> None:
    if ok:
        assert artifacts.parse_kek(text, "k") == bytes(range(32))
    else:
        with pytest.raises(InvalidArgument, match="^k: a key-encryption key is 32 bytes"):
            artifacts.parse_kek(text, "k")


def test_public_keys_file_with_several_keys() -> None:
    pem = keys.public_key_pem(KEY.public_key()) + keys.public_key_pem(
        OTHER.public_key())
    loaded = artifacts.load_public_keys(pem, "trusted")
    assert set(loaded) == {artifacts.key_id(KEY.public_key()), artifacts.key_id(OTHER.public_key())}
    with pytest.raises(InvalidArgument, match="holds no PEM public key"):
        artifacts.load_public_keys(b"", "trusted")
    reloaded = artifacts.load_private_key(keys.private_key_pem(KEY), "signing.key")
    assert artifacts.key_id(reloaded.public_key()) == artifacts.key_id(KEY.public_key())


def test_version_must_be_positive_integer() -> None:
    with pytest.raises(InvalidArgument, match="version must be a positive integer, not '0'"):
        artifacts.build_manifest(model="m", version="0", artifact="a", plaintext=b"", inputs=[],
                                 outputs=[], pushed_by="x", pushed_at="t")
