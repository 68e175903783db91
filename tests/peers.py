"""What a servicer reads of a call's TLS peer, for servicers called in process: the mesh
identity as gRPC names it from the peer's certificate (`peer_identities()`)."""

from meshserve.common.certificates import spiffe_id


class Peer:
    """A call's context from a certificate whose identity is `identity` (default: the
    operator's, `client/developer`)."""

    def __init__(self, identity: str = "client/developer") -> None:
        self._names = [spiffe_id(identity).encode()]

    def peer_identity_key(self) -> str:
        return "x509_subject_alternative_name"

    def peer_identities(self) -> list[bytes]:
        return self._names

    def auth_context(self) -> dict:
        return {}
