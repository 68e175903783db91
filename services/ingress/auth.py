"""Who is calling, and may they: the ingress's authentication and authorization.

A caller proves who it is with a client certificate (the mutual-TLS listener: the principal
is the SPIFFE identity, else the first DNS name) or with `authorization: Bearer <JWT>` (the
token listener: the principal is the token's `sub`). On the mutual-TLS listener a token may
be sent as well; it adds what it grants to what the certificate's principal may do.

`Gate.caller(context)` authenticates; `Gate.authorize(caller, action, model)` and
`Gate.admit(caller)` (the rate limit; its refusal carries a retry hint) raise the domain
errors callers see. Every denial is counted, logged without any token, and a sampled
fraction is passed to `on_denied`. Refusals that concern a bearer token say so by their class
(RFC 6750's error codes, which the HTTP binding sends in its `WWW-Authenticate` challenge):
InvalidToken (`tokens`) for a token refused, MalformedAuthorization for an `authorization`
header that holds no single token, InsufficientScope for a denial that only the token's own
`scope` or `models` narrowing caused. A model name is the caller's to choose: refusals, logs
and the audit log show at most SHOWN_CHARACTERS of it, escaped (`shown`), and decisions
about longer names are not remembered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshserve.common.access import Limit, Policy
from meshserve.common.certificates import IdentityCache, peer_identity_of, principal_of
from meshserve.common.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from meshserve.ingress.quota import Buckets
from meshserve.ingress.tokens import CLOCK_SKEW_S, Keys, Verifier

log = logging.getLogger(__name__)

NO_CREDENTIALS = ("no credentials: present a client certificate on the mutual-TLS port or "
                  "send 'authorization: Bearer <token>'")
NOT_BEARER = "authorization metadata must be 'Bearer <token>'"
ONE_BEARER = "authorization metadata must hold one 'Bearer <token>' and be sent once"
# The most of a caller-chosen name (a model's) that refusals, logs and audit records show,
# and the longest whose decision is remembered.
SHOWN_CHARACTERS = 256

OnDenied = Callable[[str, str, str, str], None]


class MalformedAuthorization(Unauthenticated):
    """`authorization: Bearer` without a token, or with more than one (RFC 6750
    `invalid_request`)."""

    bearer_error = "invalid_request"


class InsufficientScope(PermissionDenied):
    """Refused only because a token's `scope` or `models` claim leaves the action out: its
    principal may, the token does not (RFC 6750 `insufficient_scope`)."""

    bearer_error = "insufficient_scope"


@dataclass(frozen=True)
class Credential:
    """One proof of identity: a principal (None: anonymous), its groups, and what a token
    narrows it to (None: not narrowed)."""

    principal: str | None
    groups: frozenset[str] = frozenset()
    scopes: frozenset[str] | None = None
    models: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Caller:
    credentials: tuple[Credential, ...]

    @property
    def principal(self) -> str | None:
        return self.credentials[0].principal

    @property
    def name(self) -> str:
        return self.principal or "anonymous"


def bearer_token(metadata: Sequence[tuple[str, object]] | None) -> str | None:
    """The token of the one `authorization: Bearer <token>` (the scheme in any case);
    Unauthenticated for another scheme, or for two of them: sent twice, or joined by a
    comma as HTTP joins a repeated header, they would leave which one counts to chance."""
    token = None
    for key, value in metadata or ():
        if key == "authorization":
            if token is not None:
                raise MalformedAuthorization(ONE_BEARER)
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer":
                raise Unauthenticated(NOT_BEARER)
            if not token:
                raise MalformedAuthorization(NOT_BEARER)
            if "," in token:
                raise MalformedAuthorization(ONE_BEARER)
    return token


def shown(name: str) -> str:
    """A caller-chosen name as refusals, logs and audit records show it: non-printable
    characters escaped, at most SHOWN_CHARACTERS of it, and its length when cut."""
    if len(name) <= SHOWN_CHARACTERS and name.isprintable():
        return name
    text = name[:SHOWN_CHARACTERS].encode("unicode_escape").decode("ascii")
    return text if len(name) <= SHOWN_CHARACTERS else f"{text}… ({len(name)} characters)"


class Gate:
    """`policy()` gives the current policy, `keys()` the current verification keys;
    `wall_clock` checks token times, give or take `leeway` seconds (the issuer's clock may
    differ), `clock` (monotonic) drives the rate limits and `random` the sampling of
    `on_denied`."""

    def __init__(self, policy: Callable[[], Policy], keys: Callable[[], Keys], *,
                 issuer: str, audience: str, wall_clock: Callable[[], float],
                 clock: Callable[[], float], random: Callable[[], float],
                 on_denied: OnDenied | None = None, denied_sample: float = 0.01,
                 count_denied: Callable[[str], None] | None = None,
                 leeway: float = CLOCK_SKEW_S) -> None:
        self._policy = policy
        self._tokens = Verifier(keys, issuer=issuer, audience=audience, leeway=leeway)
        self._wall_clock = wall_clock
        self._random = random
        self._on_denied = on_denied
        self._denied_sample = denied_sample
        self._count_denied = count_denied
        self._buckets = Buckets(clock)
        self._decisions = Decisions()
        # A client certificate's principal (SPIFFE identity, else first DNS SAN), by its PEM.
        self._principals = IdentityCache(size=1024, parse=principal_of, unknown=None)

    def caller(self, context, metadata=None) -> Caller:
        """The caller of a gRPC call, from its metadata (`metadata`, when the caller has read
        it already) and its TLS peer: a certificate's mesh identity as gRPC names the peer
        (every call of a mesh client), else the certificate's principal read from the
        certificate itself."""
        if metadata is None:
            metadata = context.invocation_metadata()
        identity = peer_identity_of(context)
        if identity is not None:
            return self._authenticated(metadata, identity)
        pem = (context.auth_context() or {}).get("x509_pem_cert")
        return self.authenticate(metadata, pem[0] if pem else None)

    def authenticate(self, metadata, certificate: bytes | None) -> Caller:
        principal = None
        if certificate is not None:
            principal = self._principals(certificate)
            if principal is None:
                self._deny(None, "", "", "unauthenticated",
                           Unauthenticated("client certificate names no identity"))
        return self._authenticated(metadata, principal)

    def _authenticated(self, metadata, principal: str | None) -> Caller:
        """The caller with the certificate's `principal` (None: no certificate) and the
        credential of the token in `metadata`, if any."""
        credentials = [] if principal is None else [Credential(principal)]
        try:
            token = bearer_token(metadata)
            if token is not None:
                credentials.append(self._token_credential(token))
        except Unauthenticated as error:
            name = credentials[0].principal if credentials else None
            self._deny(name, "", "", "unauthenticated", error)
        if not credentials:
            if not self._policy().admits_anonymous:
                self._deny(None, "", "", "unauthenticated", Unauthenticated(NO_CREDENTIALS))
            credentials.append(Credential(None))
        return Caller(tuple(credentials))

    def _token_credential(self, token: str) -> Credential:
        grant = self._tokens.grant(token, self._wall_clock())
        return Credential(grant.subject, grant.groups, grant.scopes, grant.models)

    def allows(self, caller: Caller, action: str, model: str) -> bool:
        policy = self._policy()
        decisions = self._decisions.of(policy)
        key = (caller.credentials, action, model)
        allowed = decisions.get(key)
        if allowed is None:
            allowed = any(policy.allowed(c.principal, c.groups, c.scopes, action, model,
                                         c.models) for c in caller.credentials)
            if len(model) <= SHOWN_CHARACTERS:  # a caller may send names of any length
                decisions[key] = allowed
        return allowed

    def authorize(self, caller: Caller, action: str, model: str, what: str = "") -> None:
        """PERMISSION_DENIED unless the caller may; the same answer whether or not the
        model exists. `what`, when given, names the call in the refusal (one about the
        service's settings rather than a model's requests)."""
        if not self.allows(caller, action, model):
            refusal = (InsufficientScope if self._narrowed(caller, action, model)
                       else PermissionDenied)
            message = (f"'{caller.name}' may not {what} (the policy's '{action}' on model "
                       f"'{shown(model)}')" if what else
                       f"'{caller.name}' may not {action} model '{shown(model)}'")
            self._deny(caller.principal, action, model, "permission_denied", refusal(message))

    def _narrowed(self, caller: Caller, action: str, model: str) -> bool:
        """Whether a token's `scope` or `models` is all that refuses the caller: its
        principal may, were the token not narrower."""
        policy = self._policy()
        return any(policy.allowed(c.principal, c.groups, None, action, model)
                   for c in caller.credentials
                   if c.scopes is not None or c.models is not None)

    def admit(self, caller: Caller, action: str = "infer", model: str = "") -> None:
        """RESOURCE_EXHAUSTED, with a retry hint, when the caller's rate limit is spent."""
        limit = self._limit(caller)
        wait = self._buckets.take(caller.name, limit.rate, limit.burst)
        if wait > 0:
            error = ResourceExhausted(f"rate limit of {limit.rate:g} requests/s for "
                                      f"'{caller.name}' reached", retry_after=wait)
            self._deny(caller.principal, action, model, "rate_limited", error)

    def default_priority(self, caller: Caller) -> int:
        return self._limit(caller).priority

    def _limit(self, caller: Caller) -> Limit:
        policy = self._policy()
        limits = self._decisions.of(policy)
        key = ("limit", caller.principal)
        limit = limits.get(key)
        if limit is None:
            limit = limits[key] = policy.limit_for(caller.principal)
        return limit

    def _deny(self, principal: str | None, action: str, model: str, reason: str,
              error: Exception):
        name = principal or "anonymous"
        model = shown(model)
        log.info("denied (%s): principal=%s action=%s model=%s: %s", reason, name,
                 action or "-", model or "-", error)
        if self._count_denied is not None:
            self._count_denied(reason)
        if self._on_denied is not None and self._random() < self._denied_sample:
            try:
                self._on_denied(name, action, model, reason)
            except Exception:  # noqa: BLE001 — auditing must not change the answer
                log.exception("on_denied hook failed")
        raise error


class Decisions:
    """What the policy decided, remembered until it changes (a policy file reload makes a
    new Policy): the same few callers ask about the same models over and over. At most
    `size` entries (callers choose model names), then it starts again."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._policy: object | None = None
        self._known: dict = {}

    def of(self, policy: object) -> dict:
        if policy is not self._policy or len(self._known) >= self._size:
            self._policy = policy
            self._known = {}
        return self._known


class OpenGate:
    """No policy configured: every caller may do everything (the ingress as before)."""

    def caller(self, context, metadata=None) -> Caller:
        return Caller((Credential(None),))

    def allows(self, caller: Caller, action: str, model: str) -> bool:
        return True

    def authorize(self, caller: Caller, action: str, model: str, what: str = "") -> None:
        pass

    def admit(self, caller: Caller, action: str = "infer", model: str = "") -> None:
        pass

    def default_priority(self, caller: Caller) -> int:
        return 0
