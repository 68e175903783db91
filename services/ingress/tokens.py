"""Bearer tokens: compact JWTs signed with Ed25519 (`alg: EdDSA`), checked against a JWKS.

`verify(token, keys, issuer=..., audience=..., now=...)` returns the token's claims or raises
InvalidToken (UNAUTHENTICATED) with a message naming the check that failed (never the token
itself).
A token is read strictly: at most MAX_TOKEN_BYTES, base64url JSON objects without repeated
members, its claims decoded only once its signature verifies, each claim of the type it must
have. Times are checked with a leeway for clocks that differ (CLOCK_SKEW_S at the ingress),
and a token may live at most MAX_LIFETIME_S (a token cannot be revoked, only outlived).
A JWKS may hold several keys at once, so tokens signed by the previous key stay valid while
a new key takes over. `JwksFile` re-reads its file when it changes; `JwksUrl` fetches when
told to refresh (at most MAX_JWKS_BYTES, within its timeout); a JWKS that cannot be read or
is not one keeps the previous keys.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import re
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from meshserve.common.errors import Unauthenticated

log = logging.getLogger(__name__)

ALGORITHM = "EdDSA"
DEFAULT_ISSUER = "meshserve"
DEFAULT_AUDIENCE = "meshserve-ingress"
# The longest token read; a longer one is refused before anything of it is decoded.
MAX_TOKEN_BYTES = 8192
# Seconds by which the issuer's clock and the ingress's may differ: a token is accepted from
# this long before its `nbf` (or `iat`) until this long after its `exp`.
CLOCK_SKEW_S = 60.0
# The longest a token may live: its `exp` at most this long after its `iat` (after now, give or
# take CLOCK_SKEW_S, when it has none). `meshserve token issue --ttl` stops at the same bound.
MAX_LIFETIME_S = 365 * 86400
# The largest JWKS document fetched from a URL.
MAX_JWKS_BYTES = 1 << 20
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

Keys = Mapping[str, Ed25519PublicKey]


class InvalidToken(Unauthenticated):
    """A bearer token that was presented and refused: expired, badly signed, malformed, not
    for this audience (RFC 6750 `invalid_token`)."""

    bearer_error = "invalid_token"


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
    """`{"keys": [...]}` → kid → public key. Keys of other types, or not for signatures, are
    skipped; ValueError, naming what is wrong, for a document that is not a JWKS or an
    Ed25519 key that is not one."""
    document = json.loads(text)
    members = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(members, list):
        raise ValueError("a JWKS must be a JSON object with a 'keys' list")
    keys = {}
    for jwk in members:
        if not isinstance(jwk, dict):
            raise ValueError("each entry of a JWKS's 'keys' must be an object")
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or "kid" not in jwk \
                or jwk.get("use", "sig") != "sig":
            continue
        kid, x = jwk["kid"], jwk.get("x")
        if not isinstance(kid, str) or not isinstance(x, str):
            raise ValueError("an Ed25519 key of a JWKS needs 'kid' and 'x' strings")
        try:
            keys[kid] = Ed25519PublicKey.from_public_bytes(unb64url(x))
        except ValueError:
            raise ValueError(f"key {kid!r} of the JWKS: 'x' is not a base64url Ed25519 public "
                             "key") from None
    return keys


def jwks_document(keys: list[Ed25519PublicKey]) -> str:
    return json.dumps({"keys": [public_jwk(key) for key in keys]}, indent=2) + "\n"


def sign(claims: Mapping[str, object], key: Ed25519PrivateKey, kid: str) -> str:
    header = {"alg": ALGORITHM, "typ": "JWT", "kid": kid}
    signing_input = ".".join(b64url(json.dumps(part, separators=(",", ":")).encode())
                             for part in (header, claims))
    return f"{signing_input}.{b64url(key.sign(signing_input.encode()))}"


class _Duplicate(ValueError):
    """A JSON object that names a member twice."""


def _unique_members(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object; one that names a member twice is refused (RFC 7519 §4 lets a parser
    keep the last, but a verifier and an issuer that keep different ones disagree on who the
    token names)."""
    members = dict(pairs)
    if len(members) != len(pairs):
        raise _Duplicate
    return members


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def _json_object(segment: str, part: str) -> dict:
    """A token's header or claims: base64url of a JSON object, strictly (no repeated member,
    no NaN or Infinity, a bounded depth)."""
    try:
        value = json.loads(unb64url(segment), object_pairs_hook=_unique_members,
                           parse_constant=_not_json)
    except _Duplicate:
        raise InvalidToken(f"bearer token is malformed: a member of its {part} appears "
                           "twice") from None
    except (ValueError, RecursionError):  # binascii.Error and UnicodeDecodeError included
        raise InvalidToken("bearer token is malformed: not base64url JSON") from None
    if not isinstance(value, dict):
        raise InvalidToken("bearer token is malformed: header and claims must be objects")
    return value


def _segments(token: str) -> list[str]:
    """The three base64url parts of a compact JWS, before anything is decoded."""
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidToken(f"bearer token is longer than {MAX_TOKEN_BYTES} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("bearer token is malformed: expected three dot-separated parts")
    if not _BASE64URL.fullmatch(token):
        raise InvalidToken("bearer token is malformed: not base64url JSON")
    return parts


def _number(claims: Mapping, name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise InvalidToken(f"bearer token claim '{name}' must be a number")
    return float(value)


def _strings(claims: Mapping, name: str, separators: str | None) -> tuple[str, ...] | None:
    """A claim that is a list of strings or one string of items split at `separators`
    (None: whitespace); None when absent."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split() if separators is None else value.split(separators)
    elif not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidToken(f"bearer token claim '{name}' must be a string or a list of "
                           "strings")
    return tuple(item.strip() for item in value if item.strip())


def scopes_of(claims: Mapping) -> frozenset[str] | None:
    """The `scope` claim (space-separated, OAuth style, or a list) as a set; None when
    absent. Unauthenticated when it is neither."""
    scopes = _strings(claims, "scope", None)
    return None if scopes is None else frozenset(word for s in scopes for word in s.split())


def models_of(claims: Mapping) -> tuple[str, ...] | None:
    """The `models` claim (a list of globs, or a comma-separated string); None when absent.
    Unauthenticated when it is neither."""
    return _strings(claims, "models", ",")


def groups_of(claims: Mapping) -> frozenset[str]:
    """The `groups` claim (a list of names); empty when absent. Unauthenticated when it is
    not a list of strings."""
    groups = claims.get("groups")
    if groups is None:
        return frozenset()
    if not isinstance(groups, list) or not all(isinstance(group, str) for group in groups):
        raise InvalidToken("bearer token claim 'groups' must be a list of strings")
    return frozenset(group for group in groups if group)


@dataclass(frozen=True)
class Grant:
    """What a token grants, read once from claims whose every type was checked: its subject,
    the scopes and models it narrows to (None: not narrowed), the groups it claims, and its
    times (seconds since the epoch; None when absent)."""

    subject: str
    scopes: frozenset[str] | None
    models: tuple[str, ...] | None
    groups: frozenset[str]
    expires: float
    not_before: float | None
    issued_at: float | None
    claims: Mapping[str, object] = field(compare=False, repr=False)


def grant_of(claims: dict, *, issuer: str, audience: str) -> Grant:
    """The grant of a token's claims; Unauthenticated naming the claim that is missing, of
    the wrong type, or not for this issuer and audience."""
    expires = _number(claims, "exp")
    if expires is None:
        raise InvalidToken("bearer token has no 'exp' claim")
    not_before, issued_at = _number(claims, "nbf"), _number(claims, "iat")
    if claims.get("iss") != issuer:
        raise InvalidToken(f"bearer token issuer is not '{issuer}'")
    audiences = claims.get("aud")
    if isinstance(audiences, str):
        audiences = [audiences]
    elif not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
        audiences = []
    if audience not in audiences:
        raise InvalidToken(f"bearer token audience does not include '{audience}'")
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise InvalidToken("bearer token has no 'sub' claim")
    if not subject.isprintable():
        raise InvalidToken("bearer token claim 'sub' must hold printable characters only")
    return Grant(subject, scopes_of(claims), models_of(claims), groups_of(claims), expires,
                 not_before, issued_at, claims)


def check_times(grant: Grant, now: float, leeway: float = 0.0) -> None:
    """Unauthenticated when `now` is past the token's `exp`, or before its `nbf` or `iat`,
    give or take `leeway` seconds (clocks differ between issuer and verifier), or when the
    token lives longer than MAX_LIFETIME_S."""
    if now >= grant.expires + leeway:
        raise InvalidToken("bearer token has expired")
    if grant.not_before is not None and now + leeway < grant.not_before:
        raise InvalidToken("bearer token is not valid yet ('nbf' is in the future)")
    if grant.issued_at is not None and now + leeway < grant.issued_at:
        raise InvalidToken("bearer token is not valid yet ('iat' is in the future)")
    check_lifetime(grant, now, leeway)


def check_lifetime(grant: Grant, now: float, leeway: float = 0.0) -> None:
    """Unauthenticated when the token's `exp` is more than MAX_LIFETIME_S after its `iat`,
    or, without an `iat`, after `now` (give or take `leeway`: the issuer's clock may run
    ahead)."""
    days = MAX_LIFETIME_S // 86400
    if grant.issued_at is not None:
        if grant.expires - grant.issued_at > MAX_LIFETIME_S:
            raise InvalidToken(f"bearer token claim 'exp' is more than {days} days after its "
                               "'iat' (the longest lifetime accepted)")
    elif grant.expires - now > MAX_LIFETIME_S + leeway:
        raise InvalidToken(f"bearer token claim 'exp' is more than {days} days from now (the "
                           "longest lifetime accepted; the token has no 'iat')")


def verify(token: str, keys: Keys, *, issuer: str, audience: str, now: float,
           leeway: float = 0.0) -> dict:
    """The claims of a valid token; Unauthenticated naming the failed check otherwise.
    `exp` is required; `nbf` and `iat` are checked when present; `aud` may be a string or a
    list."""
    claims, _, _ = verified(token, keys)
    check_claims(claims, issuer=issuer, audience=audience, now=now, leeway=leeway)
    return claims


def verified(token: str, keys: Keys) -> tuple[dict, str, Ed25519PublicKey]:
    """(claims, kid, key) of a token whose signature verifies; claims not checked yet. The
    claims are decoded only once the signature holds: what an unsigned token says is never
    read."""
    header_part, claims_part, signature_part = _segments(token)
    header = _json_object(header_part, "header")
    if header.get("alg") != ALGORITHM:
        raise InvalidToken(f"bearer token algorithm must be {ALGORITHM}")
    if "crit" in header:
        raise InvalidToken("bearer token header 'crit' names extensions this verifier "
                           "does not support")
    kid = header.get("kid", "")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise InvalidToken("bearer token is signed by an unknown key")
    try:
        key.verify(unb64url(signature_part), f"{header_part}.{claims_part}".encode())
    except (InvalidSignature, ValueError):
        raise InvalidToken("bearer token signature does not verify") from None
    return _json_object(claims_part, "claims"), kid, key


def check_claims(claims: dict, *, issuer: str, audience: str, now: float,
                 leeway: float = 0.0) -> None:
    """The claim, time, issuer, audience and subject checks of `verify`."""
    check_times(grant_of(claims, issuer=issuer, audience=audience), now, leeway)


class Verifier:
    """`verify` against the current keys, remembering what the last `size` tokens whose
    signature verified grant (or why their claims refuse them): a client that reuses its
    token pays for the signature check and the reading of its claims once. The times are
    checked on every use, and a remembered token counts only while the key that signed it is
    still in the JWKS."""

    def __init__(self, keys: Callable[[], Keys], *, issuer: str, audience: str,
                 leeway: float = 0.0, size: int = 1024) -> None:
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._size = size
        self._seen: OrderedDict[str, tuple[Grant | str, str, Ed25519PublicKey]] = OrderedDict()

    def grant(self, token: str, now: float) -> Grant:
        keys = self._keys()
        seen = self._seen.get(token)
        if seen is None or keys.get(seen[1]) is not seen[2]:
            claims, kid, key = verified(token, keys)
            try:
                grant: Grant | str = grant_of(claims, issuer=self._issuer,
                                              audience=self._audience)
            except InvalidToken as refused:
                grant = refused.message
            seen = self._seen[token] = (grant, kid, key)
            if len(self._seen) > self._size:
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(token)
        if isinstance(seen[0], str):
            raise InvalidToken(seen[0])
        check_times(seen[0], now, self._leeway)
        return seen[0]

    def claims(self, token: str, now: float) -> Mapping[str, object]:
        return self.grant(token, now).claims


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
        except (OSError, ValueError) as error:
            log.warning("JWKS %s not reloaded, keeping %d key(s): %s", self._path,
                        len(self._keys), error)
        return self._keys


@dataclass
class JwksUrl:
    """Keys fetched from a JWKS URL by `refresh()` (run it periodically off the loop). A
    fetch reads at most MAX_JWKS_BYTES and gives up `timeout` seconds after it started (a
    server that sends slowly holds it no longer); one that fails keeps the keys."""

    url: str
    timeout: float = 5.0

    def __post_init__(self) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}

    def keys(self) -> Keys:
        return self._keys

    def fetch(self) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout) as reply:  # noqa: S310
                body = read_bounded(reply, MAX_JWKS_BYTES, deadline)
            self._keys = parse_jwks(body.decode())
        except (OSError, ValueError) as error:
            log.warning("JWKS %s not fetched, keeping %d key(s): %s", self.url,
                        len(self._keys), error)


def read_bounded(reply, limit: int, deadline: float, clock: Callable[[], float] = time.monotonic
                 ) -> bytes:
    """`reply`'s body (an HTTP response), refused past `limit` bytes or `deadline`:
    OSError naming the bound."""
    chunks, size = [], 0
    while chunk := reply.read1(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise OSError(f"the document is larger than {limit} bytes")
        if clock() > deadline:
            raise TimeoutError("the document did not arrive within the timeout")
        chunks.append(chunk)
    return b"".join(chunks)


def jwks_source(location: str, clock: Callable[[], float]) -> JwksFile | JwksUrl:
    """A file path, or an http(s) URL."""
    if location.startswith(("http://", "https://")):
        source = JwksUrl(location)
        source.fetch()
        return source
    return JwksFile(Path(location), clock)
