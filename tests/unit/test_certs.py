"""meshserve.tools.certs: the development CA, the identity leaves and the CLI."""

import argparse
import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshserve.common.certificates import TRUST_DOMAIN, identity_of, names_of, principal_of
from meshserve.tools import certs
from meshserve.tools.certs import IDENTITIES, init_certs


def load(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def assert_signed_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    assert cert.issuer == ca.subject
    ca.public_key().verify(
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
    )
    cert.verify_directly_issued_by(ca)


def sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def eku(cert: x509.Certificate) -> set:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs") / "dev"
    init_certs(directory)
    return directory


def test_creates_every_file(cert_dir):
    names = {p.name for p in cert_dir.iterdir()}
    expected = {"ca.crt", "ca.key", "client.crt", "client.key"}
    for identity in IDENTITIES:
        expected |= {f"{identity}.crt", f"{identity}.key"}
    assert names == expected  # and no temporary files left behind
    assert stat.S_IMODE(cert_dir.stat().st_mode) == 0o700


def test_keys_are_private_pkcs8(cert_dir):
    for key in cert_dir.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----"), key


def test_ca(cert_dir):
    ca = load(cert_dir / "ca.crt")
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert_signed_by(ca, ca)


@pytest.mark.parametrize("identity", IDENTITIES)
def test_identity_leaf(cert_dir, identity):
    ca = load(cert_dir / "ca.crt")
    leaf = load(cert_dir / f"{identity}.crt")
    assert_signed_by(leaf, ca)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = sans(leaf)
    assert set(san.get_values_for_type(x509.DNSName)) == {identity, "localhost"}
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TRUST_DOMAIN}/{identity}"
    ]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert eku(leaf) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.not_valid_after_utc <= ca.not_valid_after_utc
    assert identity_of((cert_dir / f"{identity}.crt").read_bytes()) == identity


def test_client_leaf(cert_dir):
    leaf = load(cert_dir / "client.crt")
    assert_signed_by(leaf, load(cert_dir / "ca.crt"))
    san = sans(leaf)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://meshserve.local/client/developer"
    ]
    assert san.get_values_for_type(x509.DNSName) == ["client"]
    assert eku(leaf) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert identity_of((cert_dir / "client.crt").read_bytes()) == "client/developer"


def test_identity_of_without_spiffe_uri(cert_dir, tmp_path):
    certs.issue_leaf(cert_dir / "ca.crt", cert_dir / "ca.key", tmp_path, "plain",
                     ["DNS:plain", "URI:spiffe://elsewhere.example/router"], days=1)
    assert identity_of((tmp_path / "plain.crt").read_bytes()) is None
    assert identity_of((cert_dir / "ca.crt").read_bytes()) is None  # no SAN at all


def test_a_principal_is_the_identity_else_the_first_dns_name(cert_dir, tmp_path):
    certs.issue_leaf(cert_dir / "ca.crt", cert_dir / "ca.key", tmp_path, "plain",
                     ["DNS:plain", "DNS:other", "URI:spiffe://elsewhere.example/x"], days=1)
    assert principal_of((cert_dir / "client.crt").read_bytes()) == "client/developer"
    assert principal_of((tmp_path / "plain.crt").read_bytes()) == "plain"
    assert principal_of((cert_dir / "ca.crt").read_bytes()) is None


def test_a_metric_label_is_the_first_dns_name_else_the_common_name(cert_dir):
    assert names_of((cert_dir / "client.crt").read_bytes()).label == "client"
    assert names_of((cert_dir / "router.crt").read_bytes()).label == "router"
    assert names_of((cert_dir / "ca.crt").read_bytes()).label == "meshserve development CA"


def test_issue_leaf_never_overwrites(cert_dir):
    with pytest.raises(FileExistsError):
        certs.issue_leaf(cert_dir / "ca.crt", cert_dir / "ca.key", cert_dir, "router",
                         ["DNS:router"], days=1)


def test_second_init_changes_nothing(tmp_path):
    directory = tmp_path / "certs"
    init_certs(directory, days=30)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in directory.iterdir()}
    init_certs(directory, days=30)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in directory.iterdir()}
    assert after == before


def test_missing_leaf_is_reissued_by_the_same_ca(tmp_path):
    init_certs(tmp_path)
    ca_before = (tmp_path / "ca.crt").read_bytes()
    (tmp_path / "batcher.crt").unlink()
    (tmp_path / "batcher.key").unlink()
    init_certs(tmp_path)
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    assert_signed_by(load(tmp_path / "batcher.crt"), load(tmp_path / "ca.crt"))


def test_leaves_without_ca_are_refused(tmp_path):
    init_certs(tmp_path)
    (tmp_path / "ca.crt").unlink()
    (tmp_path / "ca.key").unlink()
    with pytest.raises(certs.CertsError, match="[Rr]emove the directory"):
        init_certs(tmp_path)
    assert not (tmp_path / "ca.crt").exists()


def test_half_a_pair_is_refused(tmp_path):
    init_certs(tmp_path)
    (tmp_path / "compute.key").unlink()
    before = (tmp_path / "compute.crt").read_bytes()
    with pytest.raises(certs.CertsError, match="compute"):
        init_certs(tmp_path)
    assert (tmp_path / "compute.crt").read_bytes() == before


def make_parser():
    parser = argparse.ArgumentParser(prog="meshserve")
    certs.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_init(tmp_path, capsys):
    directory = tmp_path / "cli"
    args = make_parser().parse_args(["certs", "init", str(directory), "--days", "10"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"CA: {directory / 'ca.crt'}" in out
    for path in certs.expected_files(directory):
        assert path.exists()
        assert f"wrote {path}" in out
    leaf = load(directory / "router.crt")
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 10 * 86400 <= lifetime.total_seconds() <= 10 * 86400 + 600

    assert args.func(args) == 0  # again: nothing written
    out = capsys.readouterr().out
    assert "wrote" not in out
    assert f"CA: {directory / 'ca.crt'}" in out


def test_cli_reports_errors(tmp_path, capsys):
    init_certs(tmp_path)
    (tmp_path / "ca.key").unlink()
    args = make_parser().parse_args(["certs", "init", str(tmp_path)])
    assert args.func(args) == 1
    assert "ca.key" in capsys.readouterr().err


def test_cli_rejects_bad_days(tmp_path):
    with pytest.raises(SystemExit):
        make_parser().parse_args(["certs", "init", str(tmp_path), "--days", "0"])


def test_cli_rotate_says_when_the_ca_ends_the_leaves_first(tmp_path, capsys):
    init_certs(tmp_path, days=10)
    ca_end = load(tmp_path / "ca.crt").not_valid_after_utc
    args = make_parser().parse_args(["certs", "rotate", str(tmp_path), "--days", "1000",
                                     "--settle", "0"])
    assert args.func(args) == 0
    warning = capsys.readouterr().out.splitlines()[-1]
    assert warning.startswith(f"warning: the new certificates expire on "
                              f"{ca_end:%Y-%m-%d %H:%M} UTC, when the CA in "
                              f"{tmp_path / 'ca.crt'} does, not on "), warning
    assert " UTC as --days 1000 asked; " in warning
    assert load(tmp_path / "router.crt").not_valid_after_utc == ca_end

    args = make_parser().parse_args(["certs", "rotate", str(tmp_path), "--days", "3",
                                     "--settle", "0"])
    assert args.func(args) == 0
    assert "warning" not in capsys.readouterr().out  # within the CA's life: nothing to say


def test_cli_rotate_without_days_warns_only_when_the_ca_ends_soon(tmp_path, capsys):
    init_certs(tmp_path, days=364)  # as `up`'s CA of 365 days a day later: leaves end with it
    args = make_parser().parse_args(["certs", "rotate", str(tmp_path), "--settle", "0"])
    assert args.func(args) == 0
    assert "warning" not in capsys.readouterr().out
    init_certs(tmp_path / "short", days=10)
    args = make_parser().parse_args(["certs", "rotate", str(tmp_path / "short"),
                                     "--settle", "0"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        "warning: the new certificates expire on ")
