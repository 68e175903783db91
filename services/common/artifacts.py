"""Signed provenance and envelope encryption of model artifacts: pure functions, no I/O.

A version directory holds the artifact (`model.pt`, or `model.pt.enc` when encrypted), a
`manifest.json` and a `manifest.sig`:

- The manifest says what the artifact is and where it came from: model, version, the
  artifact's file name, `digest` (sha256 of the **plaintext** model file, the bytes
  torch loads), size, the input/output signature from config.pbtxt, who pushed it, when,
  the source (URI, training run or commit) and notes.
- The signature is Ed25519, detached, over the manifest's canonical JSON (sorted keys, no
  spaces, UTF-8) **without** its `wrapped_key` field. `manifest.sig` is JSON:
  `{"algorithm": "Ed25519", "key_id": ..., "signature": base64}`. A key id is
  `ed25519:` and the first 16 hex digits of the sha256 of the raw public key.
- Encryption is AES-256-GCM with a random data key per artifact (nonce 12 bytes; the
  plaintext digest is the associated data, tying the ciphertext to the signed manifest).
  The data key is wrapped by a key-encryption key (KEK), also AES-256-GCM, and kept in the
  manifest's `wrapped_key`, which the signature leaves out: re-wrapping under a new KEK
  needs no signing key, and a tampered wrapped key can only make decryption fail (the
  plaintext digest is checked after decrypting anyway). `encryption.ciphertext_digest`
  is signed, so a changed `.enc` file is caught without the KEK.

Failures raise `ArtifactRefused` (FAILED_PRECONDITION) with a message saying why.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshserve.common.errors import FailedPrecondition, InvalidArgument

FORMAT = "meshserve-manifest/1"
MANIFEST_FILENAME = "manifest.json"
SIGNATURE_FILENAME = "manifest.sig"
ENCRYPTED_SUFFIX = ".enc"
ALGORITHM = "AES-256-GCM"
KEY_BYTES = 32
NONCE_BYTES = 12
UNSIGNED_FIELDS = ("wrapped_key",)
_WRAP_AAD = b"meshserve data key"

Random = Callable[[int], bytes]


class ArtifactRefused(FailedPrecondition):
    """An artifact or manifest that must not be loaded, and why."""


# --------------------------------------------------------------------------- digests, JSON


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def short(digest: str) -> str:
    """`sha256:` and the first 12 hex digits, for messages."""
    return digest[:19] + ".." if len(digest) > 19 else digest


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def signed_payload(manifest: Mapping[str, Any]) -> bytes:
    """The bytes the signature covers: the canonical manifest without `wrapped_key`."""
    return canonical_json({k: v for k, v in manifest.items() if k not in UNSIGNED_FIELDS})


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """manifest.json as written: indented for people; the signature does not depend on it."""
    return (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()


def parse_manifest(data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ArtifactRefused(f"manifest is not JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactRefused(f"manifest is not a {FORMAT} manifest")
    for name in ("model", "version", "artifact", "digest"):
        if not isinstance(manifest.get(name), str) or not manifest[name]:
            raise ArtifactRefused(f"manifest has no '{name}'")
    return manifest


def build_manifest(*, model: str, version: str, artifact: str, plaintext: bytes,
                   inputs: list[dict], outputs: list[dict], pushed_by: str, pushed_at: str,
                   source: str = "", notes: str = "") -> dict[str, Any]:
    """The manifest of an unencrypted artifact (see `encrypt` for the encrypted form)."""
    if not model or not version.isdigit() or int(version) < 1:
        raise InvalidArgument(f"version must be a positive integer, not '{version}'")
    return {"format": FORMAT, "model": model, "version": version, "artifact": artifact,
            "digest": sha256_digest(plaintext), "size": len(plaintext), "inputs": inputs,
            "outputs": outputs, "pushed_by": pushed_by, "pushed_at": pushed_at,
            "source": source, "notes": notes}


def stored_filename(manifest: Mapping[str, Any]) -> str:
    """The file in the version directory: the artifact, or its `.enc` when encrypted."""
    encryption = manifest.get("encryption")
    return encryption["file"] if encryption else manifest["artifact"]


# --------------------------------------------------------------------------- signing keys


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(pem: bytes, source: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:
        raise InvalidArgument(f"{source}: not a PEM private key ({error})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidArgument(f"{source}: the signing key must be Ed25519")
    return key


def load_public_keys(pem: bytes, source: str) -> dict[str, Ed25519PublicKey]:
    """Every Ed25519 public key in a PEM file (a trusted-signers file may hold several)."""
    keys: dict[str, Ed25519PublicKey] = {}
    marker = b"-----END PUBLIC KEY-----"
    for block in pem.split(marker)[:-1]:
        try:
            key = serialization.load_pem_public_key(block.strip() + b"\n" + marker + b"\n")
        except ValueError as error:
            raise InvalidArgument(f"{source}: not a PEM public key ({error})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise InvalidArgument(f"{source}: trusted signers' keys must be Ed25519")
        keys[key_id(key)] = key
    if not keys:
        raise InvalidArgument(f"{source}: holds no PEM public key")
    return keys


def sign(manifest: Mapping[str, Any], key: Ed25519PrivateKey) -> bytes:
    """manifest.sig for `manifest`."""
    signature = key.sign(signed_payload(manifest))
    return canonical_json({"algorithm": "Ed25519", "key_id": key_id(key.public_key()),
                           "signature": base64.b64encode(signature).decode()}) + b"\n"


def verify_signature(manifest: Mapping[str, Any], signature_file: bytes,
                     trusted: Mapping[str, Ed25519PublicKey]) -> str:
    """The signer's key id when a trusted key signed `manifest`; ArtifactRefused if not."""
    try:
        record = json.loads(signature_file.decode("utf-8"))
        signer, signature = record["key_id"], base64.b64decode(record["signature"],
                                                               validate=True)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, binascii.Error):
        raise ArtifactRefused("manifest signature file is malformed") from None
    key = trusted.get(signer)
    if key is None:
        raise ArtifactRefused(f"manifest signed by an unknown key (key id {signer})")
    try:
        key.verify(signature, signed_payload(manifest))
    except InvalidSignature:
        raise ArtifactRefused(f"manifest signature does not verify with key {signer}: the "
                              "manifest was changed after signing") from None
    return signer


def check_digest(expected: str, data: bytes, what: str = "artifact") -> None:
    actual = sha256_digest(data)
    if actual != expected:
        raise ArtifactRefused(f"{what} digest {short(actual)} does not match the manifest's "
                              f"{short(expected)}")


# --------------------------------------------------------------------------- envelope


def parse_kek(data: bytes, source: str) -> bytes:
    """A key-encryption key: 32 raw bytes, or 64 hex digits, or base64 of 32 bytes."""
    if len(data) == KEY_BYTES:
        return data
    text = data.strip()
    candidates = []
    if len(text) == 2 * KEY_BYTES:
        with contextlib.suppress(UnicodeDecodeError, ValueError):
            candidates.append(bytes.fromhex(text.decode("ascii")))
    with contextlib.suppress(binascii.Error, ValueError):
        candidates.append(base64.b64decode(text, validate=True))
    for key in candidates:
        if len(key) == KEY_BYTES:
            return key
    raise InvalidArgument(f"{source}: a key-encryption key is 32 bytes (raw, 64 hex digits or "
                          "base64)")


def kek_id(kek: bytes) -> str:
    return "kek:" + hashlib.sha256(b"meshserve kek id" + kek).hexdigest()[:16]


def new_kek(random: Random = os.urandom) -> bytes:
    return random(KEY_BYTES)


def wrap_key(data_key: bytes, kek: bytes, random: Random = os.urandom) -> dict[str, str]:
    nonce = random(NONCE_BYTES)
    wrapped = AESGCM(kek).encrypt(nonce, data_key, _WRAP_AAD)
    return {"algorithm": ALGORITHM, "kek_id": kek_id(kek), "nonce": _b64(nonce),
            "key": _b64(wrapped)}


def unwrap_key(wrapped: Mapping[str, str], kek: bytes) -> bytes:
    if wrapped.get("kek_id") != kek_id(kek):
        raise ArtifactRefused(f"the data key is wrapped by key-encryption key "
                              f"{wrapped.get('kek_id')}, not by the one given ({kek_id(kek)})")
    try:
        return AESGCM(kek).decrypt(_unb64(wrapped["nonce"]), _unb64(wrapped["key"]), _WRAP_AAD)
    except (InvalidTag, KeyError, ValueError, binascii.Error):
        raise ArtifactRefused("the wrapped data key does not unwrap with the given "
                              "key-encryption key") from None


def encrypt(manifest: Mapping[str, Any], plaintext: bytes, kek: bytes,
            random: Random = os.urandom) -> tuple[dict[str, Any], bytes]:
    """(the manifest of the encrypted form, the ciphertext). `manifest.digest` must be the
    plaintext's."""
    check_digest(manifest["digest"], plaintext)
    data_key, nonce = random(KEY_BYTES), random(NONCE_BYTES)
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, manifest["digest"].encode())
    encrypted = dict(manifest)
    encrypted["encryption"] = {"algorithm": ALGORITHM,
                               "file": manifest["artifact"] + ENCRYPTED_SUFFIX,
                               "nonce": _b64(nonce),
                               "ciphertext_digest": sha256_digest(ciphertext)}
    encrypted["wrapped_key"] = wrap_key(data_key, kek, random)
    return encrypted, ciphertext


def decrypt(manifest: Mapping[str, Any], ciphertext: bytes, kek: bytes) -> bytes:
    """The plaintext of an encrypted artifact, its digest checked."""
    encryption = manifest["encryption"]
    check_digest(encryption["ciphertext_digest"], ciphertext, "encrypted artifact")
    if "wrapped_key" not in manifest:
        raise ArtifactRefused("manifest of an encrypted artifact has no wrapped_key")
    data_key = unwrap_key(manifest["wrapped_key"], kek)
    try:
        plaintext = AESGCM(data_key).decrypt(_unb64(encryption["nonce"]), ciphertext,
                                             manifest["digest"].encode())
    except (InvalidTag, ValueError, binascii.Error):
        raise ArtifactRefused("the encrypted artifact does not decrypt (altered ciphertext "
                              "or nonce)") from None
    check_digest(manifest["digest"], plaintext)
    return plaintext


def rewrap(manifest: Mapping[str, Any], old_kek: bytes, new_kek: bytes,
           random: Random = os.urandom) -> dict[str, Any]:
    """The manifest with its data key wrapped by `new_kek`; the ciphertext is unchanged and
    the signature stays valid (it does not cover `wrapped_key`)."""
    data_key = unwrap_key(manifest["wrapped_key"], old_kek)
    rewrapped = dict(manifest)
    rewrapped["wrapped_key"] = wrap_key(data_key, new_kek, random)
    return rewrapped


# --------------------------------------------------------------------------- a version


def open_artifact(manifest_file: bytes, signature_file: bytes | None, stored: bytes,
                  trusted: Mapping[str, Ed25519PublicKey] | None,
                  kek: bytes | None) -> tuple[dict[str, Any], str, bytes]:
    """(manifest, signer key id or "", plaintext) of a version's files, or ArtifactRefused.

    `trusted` None skips the signature check (digests are still checked); `kek` None is
    refused for an encrypted artifact.
    """
    manifest = parse_manifest(manifest_file)
    signer = ""
    if trusted is not None:
        if signature_file is None:
            raise ArtifactRefused(f"{SIGNATURE_FILENAME} is missing")
        signer = verify_signature(manifest, signature_file, trusted)
    if manifest.get("encryption"):
        if kek is None:
            raise ArtifactRefused(
                f"the artifact is encrypted (key-encryption key "
                f"{manifest.get('wrapped_key', {}).get('kek_id', '?')}) and no key-encryption "
                "key was given (--kek-file or MESHSERVE_KEK_FILE)")
        return manifest, signer, decrypt(manifest, stored, kek)
    check_digest(manifest["digest"], stored)
    return manifest, signer, stored


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
