"""`meshserve token`: the deployment's token-signing keys, and bearer tokens signed with them.

Files in DIR/auth (created mode 0700 on first use):

- `signing.key`: the current Ed25519 private key (PEM PKCS8, mode 0600);
- `jwks.json`: the public keys the ingress accepts (`--jwks`), newest first, each with a
  `kid`; after `rotate-key` the previous key stays in it so tokens it signed keep working;
- `policy.yaml`: the access policy (`--policy`), written once with a development default.

    meshserve token issue --subject app/frontend --scope infer --models mlp,cnn --ttl 1h
    meshserve token rotate-key --data-dir DIR   # --create: a new key set where there is none

`--scope` takes the policy's actions only, and `--ttl` at most 365 days.

Every issued token is recorded in the control plane's audit log (action `token.issue`: the
subject, what the token grants, when it expires and the sha256 of the token, never the token
itself); `--no-audit` issues one offline, with a warning.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshserve.common.files import write_atomic
from meshserve.common.keys import private_key_pem
from meshserve.ingress.tokens import (
    DEFAULT_AUDIENCE,
    DEFAULT_ISSUER,
    MAX_LIFETIME_S,
    jwks_document,
    key_id,
    parse_jwks,
    sign,
)
from meshserve.tools.arguments import non_empty, positive_int
from meshserve.tools.connection import add_connection_flags

SIGNING_KEY = "signing.key"
JWKS = "jwks.json"
POLICY = "policy.yaml"

DEFAULT_POLICY = """\
# Who may do what at the ingress and at the control plane's admin API (by certificate
# identity); both re-read this file within a second of a change.
# Actions: infer, models:read (metadata, status), models:fetch (take an artifact's bytes),
# models:write (push), traffic:write (weights, canaries, endpoints), audit:read,
# audit:write (record events in the audit log), admin (everything).
# Principals: a client certificate's SPIFFE identity (e.g. client/developer) or a token's
# subject. Principals and models are fnmatch globs.
groups:
  developers: [client/developer]
rules:
  # The development client certificate (tls/client.crt) may do everything.
  - groups: [developers]
    actions: [admin]
    models: ["*"]
  # Any other authenticated caller may infer and read model metadata; a token's scopes and
  # `models` claim narrow this further.
  - principals: ["*"]
    actions: [infer, models:read]
    models: ["*"]
# Callers without a certificate or token are refused; to admit them, uncomment:
# anonymous:
#   actions: [models:read]
#   models: ["*"]
limits:
  # Requests per second per principal (token bucket of `burst`); rate 0: unlimited.
  default: {rate: 0}
"""

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# The longest lifetime `token issue` signs: the longest the ingress accepts.
MAX_TTL_S = MAX_LIFETIME_S


def duration(text: str) -> float:
    """`90`, `90s`, `15m`, `1h`, `2d` → seconds."""
    match = _DURATION.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive duration such as 1h")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def token_ttl(text: str) -> float:
    """`--ttl`: a positive duration of at most MAX_TTL_S (365 days)."""
    seconds = duration(text)
    if seconds > MAX_TTL_S:
        raise argparse.ArgumentTypeError(f"'{text}' is longer than the {MAX_TTL_S // 86400}d "
                                         "a token may live")
    return seconds


def seconds_text(seconds: float) -> str:
    """`90`, `31536000`, `0.5`: a number of seconds without exponent form."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def subject(text: str) -> str:
    """`--subject`: a principal the ingress accepts: not empty, printable characters only
    (it is logged and audited with every refusal)."""
    non_empty(text)
    if not text.isprintable():
        raise argparse.ArgumentTypeError("must hold printable characters only (no newline, "
                                         "tab or control character)")
    return text


def known_actions(text: str) -> str:
    """`--scope`: actions of the access policy (space- or comma-separated); an unknown one is
    refused, listing the known ones."""
    from meshserve.common.access import ACTIONS

    unknown = sorted(set(_words([text]) or []) - ACTIONS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown action(s) {', '.join(unknown)}; known: "
                                         f"{', '.join(sorted(ACTIONS))}")
    return text


def load_signing_key(auth_dir: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key((Path(auth_dir) / SIGNING_KEY).read_bytes(), None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{auth_dir / SIGNING_KEY} is not an Ed25519 key")
    return key


def _public_keys(auth_dir: Path) -> list:
    path = Path(auth_dir) / JWKS
    return list(parse_jwks(path.read_text()).values()) if path.exists() else []


def init_auth(auth_dir: Path) -> bool:
    """Create whatever is missing of the signing key, the JWKS and the policy; True when
    anything was created. Existing files are kept."""
    auth_dir = Path(auth_dir)
    auth_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    created = False
    if not (auth_dir / SIGNING_KEY).exists():
        key = Ed25519PrivateKey.generate()
        write_atomic(auth_dir / JWKS, jwks_document([key.public_key(), *_public_keys(auth_dir)])
               .encode(), 0o644)
        write_atomic(auth_dir / SIGNING_KEY, private_key_pem(key), 0o600)
        created = True
    if not (auth_dir / POLICY).exists():
        write_atomic(auth_dir / POLICY, DEFAULT_POLICY.encode(), 0o644)
        created = True
    return created


def rotate_key(auth_dir: Path, keep: int = 2) -> str:
    """A new signing key; the JWKS keeps the newest `keep` public keys (the new one and the
    previous ones still honoured). Returns the new key's kid."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    auth_dir = Path(auth_dir)
    key = Ed25519PrivateKey.generate()
    # The JWKS first: by the time a token uses the new key, the ingress can know it.
    keys = [key.public_key(), *_public_keys(auth_dir)][:keep]
    write_atomic(auth_dir / JWKS, jwks_document(keys).encode(), 0o644)
    write_atomic(auth_dir / SIGNING_KEY, private_key_pem(key), 0o600)
    return key_id(key.public_key())


def claims_for(subject: str, ttl: float, now: float, *, scopes: list[str] | None = None,
               models: list[str] | None = None, groups: list[str] | None = None,
               issuer: str = DEFAULT_ISSUER, audience: str = DEFAULT_AUDIENCE,
               not_before: float | None = None) -> dict:
    claims: dict = {"iss": issuer, "aud": audience, "sub": subject, "iat": int(now),
                    "nbf": int(now if not_before is None else not_before),
                    "exp": int(now + ttl)}
    if scopes is not None:
        claims["scope"] = " ".join(scopes)
    if models is not None:
        claims["models"] = list(models)
    if groups:
        claims["groups"] = list(groups)
    return claims


def issue(auth_dir: Path, subject: str, ttl: float, now: float | None = None,
          **options) -> str:
    """A token signed with the current key (`options`: see claims_for)."""
    key = load_signing_key(auth_dir)
    claims = claims_for(subject, ttl, time.time() if now is None else now, **options)
    return sign(claims, key, key_id(key.public_key()))


def _words(values: list[str] | None) -> list[str] | None:
    """`--scope a --scope "b c"` / `--models mlp,cnn` → a flat list; None when not given."""
    if values is None:
        return None
    return [word for value in values for word in re.split(r"[\s,]+", value) if word]


def issuance_record(token: str, scopes: list[str] | None, models: list[str] | None,
                    ttl: float) -> str:
    """What the audit log keeps of an issued token: its grants and sha256, not the token."""
    return (f"scopes={','.join(scopes) if scopes is not None else '*'} "
            f"models={','.join(models) if models is not None else '*'} ttl={seconds_text(ttl)}s "
            f"sha256={hashlib.sha256(token.encode()).hexdigest()}")


def _issue(args: argparse.Namespace) -> int:
    from meshserve.common.audit_client import record
    from meshserve.tools.traffic import control_plane_address, operator_tls

    auth_dir = args.data_dir / "auth"
    if not (auth_dir / SIGNING_KEY).exists():
        print(f"error: no signing key in {auth_dir}; run `meshserve up` or "
              f"`meshserve token rotate-key --create --data-dir {args.data_dir}` first",
              file=sys.stderr)
        return 1
    scopes, models = _words(args.scope), _words(args.models)
    token = issue(auth_dir, args.subject, args.ttl, scopes=scopes, models=models,
                  groups=_words(args.groups), issuer=args.issuer, audience=args.audience)
    if args.no_audit:
        print("warning: this token is not recorded in the audit log (--no-audit)",
              file=sys.stderr)
    else:
        try:
            record(control_plane_address(args), operator_tls(args), "token.issue",
                   args.subject, issuance_record(token, scopes, models, args.ttl))
        except Exception as error:  # noqa: BLE001 — no token without its audit record
            print(f"error: could not record the token in the audit log ({error}); start the "
                  "control plane, or pass --no-audit to issue one offline", file=sys.stderr)
            return 1
    print(token)
    return 0


def _rotate(args: argparse.Namespace) -> int:
    auth_dir = args.data_dir / "auth"
    if not (auth_dir / SIGNING_KEY).is_file():
        if not args.create:
            print(f"error: no key set to rotate: {auth_dir / SIGNING_KEY} does not exist (is "
                  "--data-dir right? --create starts a new key set)", file=sys.stderr)
            return 1
        init_auth(auth_dir)
        kid = key_id(load_signing_key(auth_dir).public_key())
        print(f"new key set in {auth_dir}: signing key {kid}")
        return 0
    kid = rotate_key(auth_dir, args.keep)
    print(f"new signing key {kid}; {auth_dir / JWKS} keeps the newest {args.keep} key(s)")
    return 0


def register(commands) -> None:
    parser = commands.add_parser("token")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    issue_parser = actions.add_parser("issue", help="print a signed bearer token")
    issue_parser.add_argument("--subject", required=True, type=subject,
                              help="the principal it names (the ingress refuses a token "
                                   "without one)")
    issue_parser.add_argument("--scope", action="append", metavar="ACTION", type=known_actions,
                              help="an action it allows (repeatable; default: no limit "
                                   "beyond the policy)")
    issue_parser.add_argument("--models", action="append", metavar="GLOB[,GLOB]",
                              help="models it may be used on (default: no limit)")
    issue_parser.add_argument("--groups", action="append", metavar="GROUP[,GROUP]")
    issue_parser.add_argument("--ttl", type=token_ttl, default=duration("1h"),
                              help="lifetime, e.g. 15m, 1h, 2d (default 1h; at most "
                                   f"{MAX_TTL_S // 86400}d)")
    issue_parser.add_argument("--issuer", default=DEFAULT_ISSUER)
    issue_parser.add_argument("--audience", default=DEFAULT_AUDIENCE)
    issue_parser.add_argument("--no-audit", action="store_true",
                              help="do not record the issuance in the audit log (offline)")
    issue_parser.set_defaults(func=_issue)
    rotate_parser = actions.add_parser("rotate-key", help="start signing with a new key")
    rotate_parser.add_argument("--keep", type=positive_int, default=2,
                               help="public keys kept in jwks.json, the new one included "
                                    "(default 2: the previous key stays valid)")
    rotate_parser.add_argument("--create", action="store_true",
                               help="start a new key set (and a default policy) when DIR/auth "
                                    "has none; without it a missing key set is an error")
    rotate_parser.set_defaults(func=_rotate)
    add_connection_flags(issue_parser)
    rotate_parser.add_argument("--data-dir", type=Path, default=Path(".meshserve"),
                               help="the deployment's data directory (keys in DIR/auth)")
