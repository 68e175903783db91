"""Bearer tokens: compact JWTs signed with Ed25519 (`alg: EdDSA`), checked against a JWKS.

`verify(token, keys, issuer=..., audience=..., now=...)` returns the token's claims or raises
Unauthenticated with a message naming the check that failed (never the token itself).
A JWKS may hold several keys at once, so tokens signed by the previous key stay valid while
a new key takes over. `JwksFile` re-reads its file when it changes; `JwksUrl` fetches when
told to refresh.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from meshserve.common.errors import Unauthenticated

log = logging.getLogger(__name__)

ALGORITHM = "EdDSA"
DEFAULT_ISSUER = "meshserve"
DEFAULT_AUDIENCE = "meshserve-ingress"

Keys = Mapping[str, Ed25519PublicKey]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_jwk(key: Ed25519PublicKey) -> dict[str, str]:
    """The JWK of a public key; its `kid` is the RFC 7638 thumbprint."""
    raw = key.public_bytes_raw()
    members = {"crv": "Ed25519", "kty": "OKP", "x": b64url(raw)}
    thumbprint = hashlib.sha256(json.dumps(members, separators=(",", ":"),
                                           sort_keys=True).encode()).digest()
    return {**members, "kid": b64url(thumbprint)[:16], "alg": ALGORITHM, "use": "sig"}


def key_id(key: Ed25519PublicKey) -> str:
    return public_jwk(key)["kid"]


def parse_jwks(text: str) -> dict[str, Ed25519PublicKey]:
    """`{"keys": [...]}` → kid → public key. Keys of other types are skipped."""
    document = json.loads(text)
    keys = {}
    for jwk in document.get("keys", []):
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or "kid" not in jwk:
            continue
        keys[jwk["kid"]] = Ed25519PublicKey.from_public_bytes(unb64url(jwk["x"]))
    return keys


def jwks_document(keys: list[Ed25519PublicKey]) -> str:
    return json.dumps({"keys": [public_jwk(key) for key in keys]}, indent=2) + "\n"


def sign(claims: Mapping[str, object], key: Ed25519PrivateKey, kid: str) -> str:
    header = {"alg": ALGORITHM, "typ": "JWT", "kid": kid}
    signing_input = ".".join(b64url(json.dumps(part, separators=(",", ":")).encode())
                             for part in (header, claims))
    return f"{signing_input}.{b64url(key.sign(signing_input.encode()))}"


def _decode(token: str) -> tuple[dict, dict, bytes, bytes]:
    parts = token.split(".")
    if len(parts) != 3:
        raise Unauthenticated("bearer token is malformed: expected three dot-separated parts")
    try:
        header = json.loads(unb64url(parts[0]))
        claims = json.loads(unb64url(parts[1]))
        signature = unb64url(parts[2])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise Unauthenticated("bearer token is malformed: not base64url JSON") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise Unauthenticated("bearer token is malformed: header and claims must be objects")
    return header, claims, signature, f"{parts[0]}.{parts[1]}".encode()


def _number(claims: dict, name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthenticated(f"bearer token claim '{name}' must be a number")
    return float(value)


def verify(token: str, keys: Keys, *, issuer: str, audience: str, now: float,
           leeway: float = 0.0) -> dict:
    """The claims of a valid token; Unauthenticated naming the failed check otherwise.
    `exp` is required; `nbf` is checked when present; `aud` may be a string or a list."""
    claims, _, _ = verified(token, keys)
    check_claims(claims, issuer=issuer, audience=audience, now=now, leeway=leeway)
    return claims


def verified(token: str, keys: Keys) -> tuple[dict, str, Ed25519PublicKey]:
    """(claims, kid, key) of a token whose signature verifies; claims not checked yet."""
    header, claims, signature, signed = _decode(token)
    if header.get("alg") != ALGORITHM:
        raise Unauthenticated(f"bearer token algorithm must be {ALGORITHM}")
    kid = header.get("kid", "")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise Unauthenticated("bearer token is signed by an unknown key")
    try:
        key.verify(signature, signed)
    except InvalidSignature:
        raise Unauthenticated("bearer token signature does not verify") from None
    return claims, kid, key


def check_claims(claims: dict, *, issuer: str, audience: str, now: float,
                 leeway: float = 0.0) -> None:
    """The time, issuer, audience and subject checks of `verify`."""
    expires = _number(claims, "exp")
    if expires is None:
        raise Unauthenticated("bearer token has no 'exp' claim")
    if now >= expires + leeway:
        raise Unauthenticated("bearer token has expired")
    not_before = _number(claims, "nbf")
    if not_before is not None and now + leeway < not_before:
        raise Unauthenticated("bearer token is not valid yet ('nbf' is in the future)")
    if claims.get("iss") != issuer:
        raise Unauthenticated(f"bearer token issuer is not '{issuer}'")
    audiences = claims.get("aud")
    audiences = [audiences] if isinstance(audiences, str) else audiences or []
    if audience not in audiences:
        raise Unauthenticated(f"bearer token audience does not include '{audience}'")
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise Unauthenticated("bearer token has no 'sub' claim")


class Verifier:
    """`verify` against the current keys, remembering the last `size` tokens whose signature
    verified: a client that reuses its token pays for the signature check once. The claims
    are checked on every use, and a remembered token counts only while the key that signed
    it is still in the JWKS."""

    def __init__(self, keys: Callable[[], Keys], *, issuer: str, audience: str,
                 leeway: float = 0.0, size: int = 1024) -> None:
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._size = size
        self._seen: OrderedDict[str, tuple[dict, str, Ed25519PublicKey]] = OrderedDict()

    def claims(self, token: str, now: float) -> dict:
        keys = self._keys()
        seen = self._seen.get(token)
        if seen is None or keys.get(seen[1]) is not seen[2]:
            seen = verified(token, keys)
            self._seen[token] = seen
            if len(self._seen) > self._size:
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(token)
        check_claims(seen[0], issuer=self._issuer, audience=self._audience, now=now,
                     leeway=self._leeway)
        return seen[0]


def scopes_of(claims: Mapping) -> frozenset[str] | None:
    """The `scope` claim (space-separated, OAuth style) as a set; None when absent."""
    scope = claims.get("scope")
    if scope is None:
        return None
    return frozenset(str(scope).split())


def models_of(claims: Mapping) -> tuple[str, ...] | None:
    """The `models` claim (a list of globs, or a comma-separated string); None when absent."""
    models = claims.get("models")
    if models is None:
        return None
    if isinstance(models, str):
        models = models.split(",")
    return tuple(str(m).strip() for m in models if str(m).strip())


def groups_of(claims: Mapping) -> frozenset[str]:
    groups = claims.get("groups") or []
    return frozenset(str(g) for g in groups) if isinstance(groups, list) else frozenset()


class JwksFile:
    """Keys from a JWKS file, re-read when its size or mtime changes; the file is looked at
    no more than once per `interval` seconds of `clock`. A file that cannot be read or
    parsed keeps the previous keys (and logs why)."""

    def __init__(self, path: Path, clock: Callable[[], float], interval: float = 1.0) -> None:
        self._path = Path(path)
        self._clock = clock
        self._interval = interval
        self._checked = float("-inf")
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, Ed25519PublicKey] = {}
        self.keys()

    def keys(self) -> Keys:
        now = self._clock()
        if now - self._checked < self._interval:
            return self._keys
        self._checked = now
        try:
            status = os.stat(self._path)
            stamp = (status.st_mtime_ns, status.st_size)
            if stamp != self._stamp:
                self._keys = parse_jwks(self._path.read_text())
                self._stamp = stamp
                log.info("JWKS %s: %d key(s)", self._path, len(self._keys))
        except (OSError, ValueError, KeyError) as error:
            log.warning("JWKS %s not reloaded, keeping %d key(s): %s", self._path,
                        len(self._keys), error)
        return self._keys


@dataclass
class JwksUrl:
    """Keys fetched from a JWKS URL by `refresh()` (run it periodically off the loop)."""

    url: str
    timeout: float = 5.0

    def __post_init__(self) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}

    def keys(self) -> Keys:
        return self._keys

    def fetch(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout) as reply:  # noqa: S310
                self._keys = parse_jwks(reply.read().decode())
        except (OSError, ValueError, KeyError) as error:
            log.warning("JWKS %s not fetched, keeping %d key(s): %s", self.url,
                        len(self._keys), error)


def jwks_source(location: str, clock: Callable[[], float]) -> JwksFile | JwksUrl:
    """A file path, or an http(s) URL."""
    if location.startswith(("http://", "https://")):
        source = JwksUrl(location)
        source.fetch()
        return source
    return JwksFile(Path(location), clock)
