"""Who may call whom: the caller's mesh identity, read from its certificate on every call.

Each internal server names the identities allowed to call it, as exact names or globs
(`client/*`); the hops behind the ingress admit, besides the hop before them, only the
operators' certificates (OPERATORS). `CallerCheck` refuses any other caller with
PERMISSION_DENIED

    identity 'router' may not call compute; allowed: batcher

Health checks (`grpc.health.v1.Health`) stay open to every certificate of the mesh CA, so
probes and `meshserve health` work with the operator's certificate. The identity is the
SPIFFE URI SAN (`spiffe://meshserve.local/<identity>`, see `meshserve.common.certificates`);
parsing a certificate is cached by its PEM bytes, so a call costs a dictionary lookup.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

import grpc

from meshserve.common.certificates import UNKNOWN, IdentityCache, peer_identity_of

HEALTH_PREFIX = "/grpc.health.v1.Health/"


# The operators' own certificates: `meshserve certs init`'s client.crt and the charts'
# operator certificate. Only they may reach the router and the batchers directly (readiness,
# statistics, a test request): a hop behind the ingress does not apply the access policy, so
# any other client certificate (`client/alice`, whom the policy may allow only to read) would
# infer on every model there, past the policy and its rate limits.
OPERATORS = "client/developer,client/operator"

# Who calls each internal server. Operators may query the router and the batchers directly;
# every client certificate may call the control plane, which decides each admin call by the
# access policy (without one: reads for every client, changes for the operators only); only a
# batcher sends compute work.
DEFAULT_CALLERS = {
    "router": f"ingress,{OPERATORS}",
    "batcher": f"router,control-plane,{OPERATORS}",
    "compute": "batcher",
    "control-plane": "router,ingress,batcher,client/*",
}


def default_callers(service: str) -> frozenset[str]:
    return parse_callers(DEFAULT_CALLERS[service])


def add_callers_flag(parser: argparse.ArgumentParser, service: str) -> None:
    """`--allow-callers ID,...`: the identities (globs) allowed to call `service`."""
    parser.add_argument(
        "--allow-callers", type=parse_callers, default=default_callers(service),
        metavar="ID,...",
        help=f"identities allowed to call (globs; default: {DEFAULT_CALLERS[service]})")


def parse_callers(text: str) -> frozenset[str]:
    """`"ingress, client/*"` as a set of patterns; empty items are ignored."""
    return frozenset(item.strip() for item in text.split(",") if item.strip())


def is_allowed(identity: str, patterns: Iterable[str]) -> bool:
    """Whether `identity` matches one of `patterns` (globs, case-sensitive; `*` crosses `/`)."""
    return any(fnmatchcase(identity, pattern) for pattern in patterns)


@functools.lru_cache(maxsize=1024)
def _admitted(identity: str, patterns: frozenset[str]) -> bool:
    """is_allowed, remembered: the same few identities call a server over and over."""
    return is_allowed(identity, patterns)


def refusal(identity: str, service: str, patterns: Iterable[str]) -> str:
    return (f"identity '{identity}' may not call {service}; "
            f"allowed: {', '.join(sorted(patterns)) or 'nobody'}")


def peer_identity(auth_context: Mapping[str, list[bytes]],
                  cache: Callable[[bytes], str]) -> str:
    """The identity of the peer's leaf certificate (`x509_pem_cert`), or "unknown";
    `cache` (an IdentityCache) maps the certificate to its identity."""
    pems = auth_context.get("x509_pem_cert") or ()
    for pem in pems:
        return cache(pem)
    return UNKNOWN


def caller_identity(context: grpc.aio.ServicerContext, cache: Callable[[bytes], str]) -> str:
    """The identity of a call's peer: from the names gRPC keeps of its certificate when they
    hold one (`peer_identity_of`), else read from the certificate (`peer_identity`)."""
    return peer_identity_of(context) or peer_identity(context.auth_context(), cache)


@dataclass(frozen=True)
class Callers:
    """The identities (patterns) allowed to call `service`."""

    service: str
    allowed: frozenset[str]

    def admits(self, identity: str) -> bool:
        return _admitted(identity, self.allowed)

    def refusal(self, identity: str) -> str:
        return refusal(identity, self.service, self.allowed)


class CallerCheck:
    """`check.refusal(context)` says why a caller that is not one of `callers` is refused
    (None: admitted). The services' server asks it as each call's headers arrive, before any
    of the request is read, health checks aside (`meshserve.common.server.admission`)."""

    def __init__(self, callers: Callers, cache: IdentityCache | None = None) -> None:
        self._callers = callers
        self._cache = cache or IdentityCache()

    def refusal(self, context: grpc.aio.ServicerContext) -> str | None:
        identity = caller_identity(context, self._cache)
        return None if self._callers.admits(identity) else self._callers.refusal(identity)
