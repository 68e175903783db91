"""What a certificate says about who holds it, read in one place.

A mesh certificate names its identity in a SPIFFE URI SAN, `spiffe://meshserve.local/<identity>`
(`meshserve certs init` and the charts' cert-manager certificates write it). Three readings
serve three purposes:

- `identity_of`: the mesh identity (SPIFFE URI), or None: who may call whom inside the mesh;
- `principal_of`: the mesh identity, else the first DNS SAN, or None: the ingress's
  authenticated principal for a client certificate;
- `names_of(...).label`: the first DNS SAN, else the subject's CN: the `identity` label of a
  service's certificate-expiry metric.

`IdentityCache` remembers one of them per PEM bytes, so a call costs a dictionary lookup;
`peer_identity_of` reads the mesh identity of a gRPC call's peer without the certificate.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

TRUST_DOMAIN = "meshserve.local"
UNKNOWN = "unknown"
SPIFFE_PREFIX = f"spiffe://{TRUST_DOMAIN}/"
_SPIFFE_PREFIX = SPIFFE_PREFIX.encode()
# The peer property gRPC lists a TLS peer's subject alternative names under, in the order the
# certificate has them (its `peer_identities()` when the certificate has any).
_SAN_PROPERTY = "x509_subject_alternative_name"


def spiffe_id(identity: str) -> str:
    """`spiffe://meshserve.local/<identity>`: the URI SAN that names `identity`."""
    return SPIFFE_PREFIX + identity


@dataclass(frozen=True)
class Names:
    """The names in a certificate: its mesh identity (None: no SPIFFE URI of our trust
    domain), its DNS SANs in order, and its subject's common name ("" when none)."""

    identity: str | None
    dns: tuple[str, ...]
    common_name: str

    @property
    def principal(self) -> str | None:
        return self.identity or next(iter(self.dns), None)

    @property
    def label(self) -> str:
        return next(iter(self.dns), None) or self.common_name


def names_of(cert_pem: bytes | str) -> Names:
    """The names in the first certificate of `cert_pem`; ValueError when it is not one."""
    if isinstance(cert_pem, str):
        cert_pem = cert_pem.encode()
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        uris, dns = [], []
    else:
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        dns = san.get_values_for_type(x509.DNSName)
    identity = next((uri[len(SPIFFE_PREFIX):] for uri in uris
                     if uri.startswith(SPIFFE_PREFIX) and len(uri) > len(SPIFFE_PREFIX)), None)
    common = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return Names(identity, tuple(dns), str(common[0].value) if common else "")


def identity_of(cert_pem: bytes | str) -> str | None:
    """The mesh identity in a certificate's SPIFFE URI SAN, or None when it has none.

    `spiffe://meshserve.local/router` gives "router", `.../client/developer` gives
    "client/developer". URIs of other trust domains are ignored.
    """
    return names_of(cert_pem).identity


def principal_of(cert_pem: bytes) -> str | None:
    """The mesh identity of a client certificate, else its first DNS SAN."""
    return names_of(cert_pem).principal


def peer_identity_of(context) -> str | None:
    """The mesh identity of a gRPC call's TLS peer, as `identity_of` reads it from the peer's
    certificate, but from the names gRPC keeps of it (`peer_identities()`, ~2 µs a call)
    instead of the certificate itself (`auth_context()`, ~17 µs); None when the peer's
    certificate has no SPIFFE URI of the trust domain, or the call no certificate. Of the
    names gRPC lists (DNS names, URIs, email and IP addresses), only a URI can begin with
    `spiffe://`."""
    if context.peer_identity_key() != _SAN_PROPERTY:
        return None
    for name in context.peer_identities():
        if name.startswith(_SPIFFE_PREFIX) and len(name) > len(_SPIFFE_PREFIX):
            return name[len(_SPIFFE_PREFIX):].decode()
    return None


_MISSING = object()


class IdentityCache:
    """`parse` (default `identity_of`) over PEM bytes, remembering the last `size`
    certificates (LRU). A certificate that names nothing, or is not one, gives `unknown`."""

    def __init__(self, size: int = 256,
                 parse: Callable[[bytes], str | None] = identity_of,
                 unknown: str | None = UNKNOWN) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self._size = size
        self._parse = parse
        self._unknown = unknown
        self._known: OrderedDict[bytes, str | None] = OrderedDict()

    def __call__(self, pem: bytes) -> str | None:
        identity = self._known.get(pem, _MISSING)
        if identity is not _MISSING:
            self._known.move_to_end(pem)
            return identity
        try:
            identity = self._parse(pem) or self._unknown
        except ValueError:
            identity = self._unknown
        self._known[pem] = identity
        if len(self._known) > self._size:
            self._known.popitem(last=False)
        return identity

    def __len__(self) -> int:
        return len(self._known)
