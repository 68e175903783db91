"""Caller identities, the allow-lists, certificate rotation and the server's reload fetcher."""

import argparse
import os

import pytest
from cryptography import x509

from meshserve.common.certificates import UNKNOWN, IdentityCache, identity_of
from meshserve.common.identity import (
    DEFAULT_CALLERS,
    Callers,
    is_allowed,
    parse_callers,
    peer_identity,
    refusal,
)
from meshserve.common.metrics import Metrics
from meshserve.common.tls import MismatchedKey, ServerCertificates, TlsFiles, check_pair
from meshserve.tools import certs as certs_cli
from meshserve.tools.certs import (
    CA_CERT,
    CertsError,
    ca_bundle,
    init_certs,
    issued_by,
    leaf_names,
    rotate_certs,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    init_certs(directory)
    return directory


@pytest.mark.parametrize(("text", "expected"), [
    ("router", {"router"}),
    ("ingress, client/*", {"ingress", "client/*"}),
    ("a,,b,", {"a", "b"}),
    ("", set()),
    (" , ", set()),
])
def test_parse_callers(text, expected):
    assert parse_callers(text) == frozenset(expected)


@pytest.mark.parametrize(("identity", "patterns", "allowed"), [
    ("ingress", {"ingress"}, True),
    ("router", {"ingress"}, False),
    ("client/developer", {"client/*"}, True),
    ("client/ops/alice", {"client/*"}, True),   # `*` crosses `/`
    ("client", {"client/*"}, False),
    ("Ingress", {"ingress"}, False),            # case-sensitive
    ("batcher", {"router", "control-plane", "client/*"}, False),
    ("control-plane", {"router", "control-plane", "client/*"}, True),
    ("batcher-2", {"batcher-?"}, True),
    ("unknown", set(), False),
    ("anyone", {"*"}, True),
])
def test_is_allowed(identity, patterns, allowed):
    assert is_allowed(identity, patterns) is allowed


def test_refusal_names_the_identity_the_service_and_the_allowed():
    assert refusal("router", "compute", {"batcher"}) == \
        "identity 'router' may not call compute; allowed: batcher"
    assert Callers("router", frozenset({"ingress", "client/*"})).refusal("batcher") == \
        "identity 'batcher' may not call router; allowed: client/*, ingress"
    assert refusal("x", "compute", set()) == "identity 'x' may not call compute; allowed: nobody"


@pytest.mark.parametrize(("service", "caller", "allowed"), [
    ("router", "ingress", True),
    ("router", "client/developer", True),
    ("router", "client/operator", True),
    ("router", "batcher", False),
    ("router", "compute", False),
    # Any other client certificate: the hops behind the ingress do not apply the policy.
    ("router", "client/alice", False),
    ("batcher", "router", True),
    ("batcher", "control-plane", True),
    ("batcher", "client/developer", True),
    ("batcher", "client/operator", True),
    ("batcher", "ingress", False),
    ("batcher", "client/alice", False),
    ("compute", "batcher", True),
    ("compute", "router", False),
    ("compute", "ingress", False),
    ("compute", "client/developer", False),
    ("control-plane", "router", True),
    ("control-plane", "ingress", True),
    ("control-plane", "batcher", True),
    ("control-plane", "client/developer", True),
    ("control-plane", "client/alice", True),  # the admin API applies the policy itself
    ("control-plane", "compute", False),
])
def test_default_callers(service, caller, allowed):
    assert Callers(service, parse_callers(DEFAULT_CALLERS[service])).admits(caller) is allowed


def test_identity_of_real_certificates(certs):
    for name in leaf_names():
        expected = "client/developer" if name == "client" else name
        assert identity_of((certs / f"{name}.crt").read_bytes()) == expected
    assert identity_of((certs / CA_CERT).read_bytes()) is None


def test_peer_identity_reads_the_leaf_of_the_auth_context(certs):
    cache = IdentityCache()
    router = (certs / "router.crt").read_bytes()
    assert peer_identity({"x509_pem_cert": [router]}, cache) == "router"
    assert peer_identity({}, cache) == UNKNOWN
    assert peer_identity({"x509_pem_cert": []}, cache) == UNKNOWN
    assert peer_identity({"x509_pem_cert": [(certs / CA_CERT).read_bytes()]}, cache) == UNKNOWN


def test_identity_cache_parses_each_certificate_once_and_evicts_the_least_recent():
    parsed = []

    def parse(pem):
        parsed.append(pem)
        return pem.decode().upper()

    cache = IdentityCache(size=2, parse=parse)
    assert [cache(b"a"), cache(b"b"), cache(b"a"), cache(b"a")] == ["A", "B", "A", "A"]
    assert parsed == [b"a", b"b"]
    cache(b"c")                      # evicts b, the least recently used
    assert len(cache) == 2
    cache(b"a")
    cache(b"b")
    assert parsed == [b"a", b"b", b"c", b"b"]


def test_identity_cache_names_unparseable_certificates_unknown():
    cache = IdentityCache()
    assert cache(b"not a certificate") == UNKNOWN
    with pytest.raises(ValueError, match="size"):
        IdentityCache(size=0)


def serials(directory):
    return {name: x509.load_pem_x509_certificate(
        (directory / f"{name}.crt").read_bytes()).serial_number for name in leaf_names()}


def test_rotate_writes_new_consistent_pairs_from_the_same_ca(tmp_path):
    init_certs(tmp_path)
    ca_before = (tmp_path / CA_CERT).read_bytes()
    before = serials(tmp_path)
    written = rotate_certs(tmp_path, days=30)
    assert len(written) == 2 * len(leaf_names())
    assert (tmp_path / CA_CERT).read_bytes() == ca_before
    after = serials(tmp_path)
    ca = ca_bundle(tmp_path)[0]
    for name in leaf_names():
        assert after[name] != before[name]
        cert, key = (tmp_path / f"{name}.crt").read_bytes(), (tmp_path / f"{name}.key").read_bytes()
        check_pair(cert, key)
        assert issued_by(cert, ca)
        assert oct((tmp_path / f"{name}.key").stat().st_mode & 0o777) == "0o600"
    assert not list(tmp_path.glob(".*.tmp"))
    assert identity_of((tmp_path / "client.crt").read_bytes()) == "client/developer"


def test_new_ca_bundle_holds_both_then_drop_old_ca_keeps_the_new(tmp_path):
    init_certs(tmp_path)
    old_ca = ca_bundle(tmp_path)[0]
    old_router = (tmp_path / "router.crt").read_bytes()
    rotate_certs(tmp_path, new_ca=True)
    bundle = ca_bundle(tmp_path)
    assert len(bundle) == 2
    new_ca, kept = bundle
    assert kept == old_ca and new_ca != old_ca
    for name in leaf_names():
        cert = (tmp_path / f"{name}.crt").read_bytes()
        assert issued_by(cert, new_ca) and not issued_by(cert, old_ca)
    assert issued_by(old_router, old_ca)

    assert rotate_certs(tmp_path, drop_old_ca=True) == [tmp_path / CA_CERT]
    assert ca_bundle(tmp_path) == [new_ca]
    assert rotate_certs(tmp_path, drop_old_ca=True) == []


def test_new_ca_settles_after_the_bundle_and_after_the_leaves(tmp_path):
    """Every service must trust the new CA before a leaf it signed appears, and present its
    new leaf before the command returns: `settle` is called at those two points."""
    init_certs(tmp_path)
    old_ca = ca_bundle(tmp_path)[0]
    seen = []

    def settle(what):
        bundle = ca_bundle(tmp_path)
        leaves_from = {name: [issued_by((tmp_path / f"{name}.crt").read_bytes(), ca)
                              for ca in bundle] for name in leaf_names()}
        seen.append((what, len(bundle), leaves_from))

    rotate_certs(tmp_path, new_ca=True, settle=settle)
    [(first, trusted, before), (second, _, after)] = seen
    assert (first, trusted, second) == ("the new CA", 2, "their new certificates")
    # bundle = [new CA, old CA]: at the first wait every leaf is still the old CA's ...
    assert all(issued == [False, True] for issued in before.values())
    # ... and at the second every leaf is the new CA's.
    assert all(issued == [True, False] for issued in after.values())
    assert ca_bundle(tmp_path)[1] == old_ca


def test_rotate_command_waits_unless_told_not_to(tmp_path, capsys, monkeypatch):
    init_certs(tmp_path)
    slept = []
    monkeypatch.setattr(certs_cli.time, "sleep", slept.append)
    parser = argparse.ArgumentParser()
    certs_cli.register(parser.add_subparsers())
    args = parser.parse_args(["certs", "rotate", str(tmp_path), "--new-ca"])
    assert args.func(args) == 0
    assert slept == [certs_cli.SETTLE_S, certs_cli.SETTLE_S]
    assert "waiting 5 s for every service to load the new CA" in capsys.readouterr().out
    args = parser.parse_args(["certs", "rotate", str(tmp_path), "--settle", "0"])
    assert args.func(args) == 0
    assert slept == [certs_cli.SETTLE_S, certs_cli.SETTLE_S]
    with pytest.raises(SystemExit):
        parser.parse_args(["certs", "rotate", str(tmp_path), "--settle", "-1"])
    assert "must be a number of at least 0, not '-1'" in capsys.readouterr().err


def test_drop_old_ca_refuses_while_a_leaf_is_from_the_old_ca(tmp_path):
    init_certs(tmp_path)
    old_router = (tmp_path / "router.crt").read_bytes(), (tmp_path / "router.key").read_bytes()
    rotate_certs(tmp_path, new_ca=True)
    (tmp_path / "router.crt").write_bytes(old_router[0])
    (tmp_path / "router.key").write_bytes(old_router[1])
    with pytest.raises(CertsError, match="router still have certificates from an old CA"):
        rotate_certs(tmp_path, drop_old_ca=True)
    assert len(ca_bundle(tmp_path)) == 2


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"days": 0}, ValueError, "days must be at least 1"),
    ({"new_ca": True, "drop_old_ca": True}, CertsError, "choose one"),
])
def test_rotate_rejects_bad_options(tmp_path, kwargs, error, match):
    init_certs(tmp_path)
    with pytest.raises(error, match=match):
        rotate_certs(tmp_path, **kwargs)


def test_rotate_needs_a_ca(tmp_path):
    with pytest.raises(CertsError, match="no CA"):
        rotate_certs(tmp_path)


def test_check_pair_refuses_a_foreign_key(certs):
    with pytest.raises(MismatchedKey):
        check_pair((certs / "router.crt").read_bytes(), (certs / "batcher.key").read_bytes())


def test_server_fetcher_reloads_changed_files_and_waits_out_a_half_written_pair(tmp_path):
    init_certs(tmp_path)
    files = TlsFiles.for_identity(tmp_path, "router")
    fetch = ServerCertificates(files)
    assert fetch() is None and fetch.reloads == 0

    # A new key next to the old certificate: the middle of a rotation. Keep the old pair.
    other = TlsFiles.for_identity(tmp_path, "batcher")
    os.replace(tmp_path / "router.key", tmp_path / "router.key.old")
    (tmp_path / "router.key").write_bytes(other.key.read_bytes())
    assert fetch() is None and fetch.reloads == 0
    assert fetch() is None  # still inconsistent: not retried until the files change again

    (tmp_path / "router.crt").write_bytes(other.cert.read_bytes())
    assert fetch() is not None and fetch.reloads == 1
    assert fetch() is None

    rotate_certs(tmp_path)
    assert fetch() is not None and fetch.reloads == 2


def expiry_of(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("meshserve_certificate_expiry_seconds",
                                             {"identity": "router"})


def test_certificate_expiry_metric_follows_a_rotation(tmp_path):
    init_certs(tmp_path, days=365)
    metrics = Metrics()
    metrics.certificate_expiry(tmp_path / "router.crt")
    before = expiry_of(metrics)
    rotate_certs(tmp_path, days=30)
    after = expiry_of(metrics)
    assert 334 * 86400 < before - after < 336 * 86400
    (tmp_path / "router.crt").write_text("being replaced")
    assert expiry_of(metrics) == after
