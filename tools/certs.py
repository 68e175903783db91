"""Development certificates for the mesh: one CA, one leaf per service identity, one client.

`meshserve certs init DIR` writes, into DIR (created with mode 0700), whatever is missing of:

- `ca.crt` / `ca.key`: a development CA (EC P-256);
- `<identity>.crt` / `<identity>.key` for each of IDENTITIES: a leaf whose SANs are
  `DNS:<identity>`, `URI:spiffe://meshserve.local/<identity>`, `DNS:localhost` and
  `IP:127.0.0.1`, usable both as a server and as a client certificate (services are
  clients of the next hop);
- `client.crt` / `client.key`: a client-only certificate for a developer
  (`URI:spiffe://meshserve.local/client/developer`, `DNS:client`).

Keys are PEM PKCS8, unencrypted, mode 0600. Existing files are never overwritten, so a
second run changes nothing.

`meshserve certs rotate DIR` re-issues every leaf from the CA; running services pick the
new files up without a restart. Each leaf's key and certificate are written to temporary
files and renamed into place key first, so a reader sees either the old pair, the new pair,
or a new key with the old certificate, which services detect and wait out.
`--new-ca` first makes a new CA: `ca.crt` becomes a bundle of the new CA and the old one
(peers keep trusting leaves of either during the overlap) and the leaves come from the new
CA. Once every service runs on the new leaves, `--drop-old-ca` leaves only the new CA in
`ca.crt` (it refuses while a leaf in DIR is still from an old CA).

Services look at their files every 2-3 s, so `rotate` waits (`--settle`, 5 s) after each
step: with `--new-ca`, once the bundle is written, so that every service trusts the new CA
before any leaf it signed appears (a service that re-read its files just before the bundle
changed would otherwise refuse a peer already on a new leaf); and once the leaves are
written, so that when the command returns every service presents its new leaf and the old
CA can go.

One module of ~500 lines on purpose: issuing, rotating and the command line share the
directory's layout and its write rules (nothing overwritten, keys 0600 from their first byte,
a key renamed into place before its certificate), which are easier to check in one place.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshserve.common.certificates import spiffe_id
from meshserve.common.files import synced_temporary
from meshserve.common.keys import private_key_pem
from meshserve.common.tls import MismatchedKey, check_pair
from meshserve.tools.arguments import non_negative_float, positive_int

IDENTITIES = ("ingress", "router", "batcher", "compute", "control-plane")
CLIENT_NAME = "client"
CLIENT_IDENTITY = "client/developer"

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
# How long `rotate` waits after each step: services look at their files every 2-3 s.
SETTLE_S = 5.0

# Tolerate small clock differences between the machine that issues and the one that checks.
_BACKDATE = datetime.timedelta(minutes=5)


class CertsError(Exception):
    """The certificate directory is in a state this tool will not repair by itself."""


def identity_sans(identity: str) -> list[str]:
    """The SANs of a service identity's certificate."""
    return [f"DNS:{identity}", f"URI:{spiffe_id(identity)}", "DNS:localhost", "IP:127.0.0.1"]


def client_sans() -> list[str]:
    return [f"URI:{spiffe_id(CLIENT_IDENTITY)}", f"DNS:{CLIENT_NAME}"]


def leaf_names() -> tuple[str, ...]:
    """Base names of every leaf init_certs issues (files `<name>.crt` / `<name>.key`)."""
    return (*IDENTITIES, CLIENT_NAME)


def expected_files(directory: Path) -> list[Path]:
    """Every file init_certs maintains in `directory`, CA first."""
    directory = Path(directory)
    files = [directory / CA_CERT, directory / CA_KEY]
    for name in leaf_names():
        files += [directory / f"{name}.crt", directory / f"{name}.key"]
    return files


# --- file writing ---------------------------------------------------------------------------


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write `path` atomically with `mode`; fail with FileExistsError if it already exists.

    The data goes to a temporary file in the same directory first (created with `mode`, so a
    key is never readable by others, not even briefly), then is linked into place: a reader
    sees either no file or the whole file, and an existing file is never replaced.
    """
    tmp = synced_temporary(path, data, mode)
    try:
        try:
            os.link(tmp, path)  # fails if `path` exists, unlike rename
        except FileExistsError:
            raise
        except OSError:
            # A filesystem without hard links: rename, after checking nothing is there.
            if path.exists():
                raise FileExistsError(path) from None
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


# --- certificate building -------------------------------------------------------------------


def parse_san(san: str) -> x509.GeneralName:
    """`DNS:name`, `URI:uri` or `IP:address` as a SAN entry."""
    kind, sep, value = san.partition(":")
    if not sep or not value:
        raise ValueError(f"SAN {san!r} is not of the form DNS:..., URI:... or IP:...")
    kind = kind.upper()
    if kind == "DNS":
        return x509.DNSName(value)
    if kind == "URI":
        return x509.UniformResourceIdentifier(value)
    if kind == "IP":
        return x509.IPAddress(ipaddress.ip_address(value))
    raise ValueError(f"SAN {san!r}: unknown kind {kind!r}; use DNS, URI or IP")


DEFAULT_DAYS = 365  # certificates' lifetime without --days
SOON_DAYS = 30  # without --days, leaves that the CA ends sooner than this are worth a warning


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    now = datetime.datetime.now(datetime.UTC)
    return now - _BACKDATE, now + datetime.timedelta(days=days)


def _create_ca(directory: Path, days: int) -> list[Path]:
    cert_pem, key_pem = _build_ca(days)
    # Key first: a CA certificate on disk always has its key next to it.
    _write_new(directory / CA_KEY, key_pem, 0o600)
    _write_new(directory / CA_CERT, cert_pem, 0o644)
    return [directory / CA_CERT, directory / CA_KEY]


def _build_ca(days: int) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a new self-signed CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshserve"),
        x509.NameAttribute(NameOID.COMMON_NAME, "meshserve development CA"),
    ])
    not_before, not_after = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), private_key_pem(key)


def _load_ca(
    ca_cert_path: Path, ca_key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_pem, key_pem = Path(ca_cert_path).read_bytes(), Path(ca_key_path).read_bytes()
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{ca_key_path} is not an EC private key")
    try:
        check_pair(cert_pem, key_pem)
    except MismatchedKey:
        raise CertsError(f"{ca_key_path} is not the key of {ca_cert_path}") from None
    return x509.load_pem_x509_certificate(cert_pem), key


def issue_leaf(
    ca_cert_path: Path,
    ca_key_path: Path,
    out_dir: Path,
    name: str,
    sans: Sequence[str],
    days: int,
    client_only: bool = False,
) -> tuple[Path, Path]:
    """Issue `<out_dir>/<name>.crt` and `.key`, signed by the CA; return (cert, key) paths.

    `sans` are strings like "DNS:x", "URI:spiffe://...", "IP:127.0.0.1". The extended key
    usage is serverAuth and clientAuth, or clientAuth alone when `client_only`. The leaf never
    outlives the CA. Raises FileExistsError if either file already exists.
    """
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.key"
    for path in (cert_path, key_path):
        if path.exists():
            raise FileExistsError(path)
    ca_cert, ca_key = _load_ca(Path(ca_cert_path), Path(ca_key_path))
    cert_pem, key_pem = _build_leaf(ca_cert, ca_key, name, sans, days, client_only)
    _write_new(key_path, key_pem, 0o600)
    _write_new(cert_path, cert_pem, 0o644)
    return cert_path, key_path


def _build_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    name: str,
    sans: Sequence[str],
    days: int,
    client_only: bool,
) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a new leaf signed by the CA."""
    if not sans:
        raise ValueError("a leaf needs at least one SAN")
    general_names = [parse_san(s) for s in sans]
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(days)
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if not client_only:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshserve"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(general_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), private_key_pem(key)


def init_certs(directory: Path, *, days: int = 365) -> None:
    """Create whatever is missing of the CA, the identity leaves and the client leaf.

    Idempotent: existing files are left untouched. Raises CertsError when the directory is
    in a state that cannot be completed without replacing files (leaves without a CA, or a
    certificate without its key or the reverse); the fix is to remove the directory.
    """
    _init_certs(Path(directory), days)


def _init_certs(directory: Path, days: int) -> list[Path]:
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)  # mkdir's mode is filtered by the umask
    elif not directory.is_dir():
        raise CertsError(f"{directory} exists and is not a directory")

    written: list[Path] = []
    ca_cert, ca_key = directory / CA_CERT, directory / CA_KEY
    leaf_files = [p for p in expected_files(directory)[2:] if p.exists()]
    if not ca_cert.exists() and not ca_key.exists():
        if leaf_files:
            raise CertsError(
                f"{directory} has certificates ({', '.join(p.name for p in leaf_files)}) but "
                f"no CA ({CA_CERT}, {CA_KEY}); they cannot be verified or completed. "
                f"Remove the directory and run init again: rm -r {directory}"
            )
        written += _create_ca(directory, days)
    elif not (ca_cert.exists() and ca_key.exists()):
        missing = CA_KEY if ca_cert.exists() else CA_CERT
        raise CertsError(
            f"{directory} has an incomplete CA ({missing} is missing). "
            f"Remove the directory and run init again: rm -r {directory}"
        )

    for name in leaf_names():
        crt, key = directory / f"{name}.crt", directory / f"{name}.key"
        if crt.exists() and key.exists():
            continue
        if crt.exists() or key.exists():
            present, absent = (crt, key) if crt.exists() else (key, crt)
            raise CertsError(
                f"{present} exists without {absent.name}. "
                f"Remove the directory and run init again: rm -r {directory}"
            )
        if name == CLIENT_NAME:
            written += issue_leaf(ca_cert, ca_key, directory, name, client_sans(), days,
                                  client_only=True)
        else:
            written += issue_leaf(ca_cert, ca_key, directory, name, identity_sans(name), days)
    return written


# --- rotation -------------------------------------------------------------------------------


def _replace_files(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write every (path, data, mode) to a temporary file, then rename them into place in
    order: readers see each file whole, old or new."""
    temporaries: list[str] = []
    try:
        for path, data, mode in files:
            temporaries.append(synced_temporary(path, data, mode))
        for (path, _, _), tmp in zip(files, temporaries, strict=True):
            os.replace(tmp, path)
    finally:
        for tmp in temporaries:
            if os.path.lexists(tmp):
                os.unlink(tmp)


def issued_by(cert_pem: bytes, ca: x509.Certificate) -> bool:
    """Whether the first certificate in `cert_pem` is signed by `ca`."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def ca_bundle(directory: Path) -> list[x509.Certificate]:
    """The CA certificates in `DIR/ca.crt`, the one that issues new leaves first."""
    return x509.load_pem_x509_certificates((Path(directory) / CA_CERT).read_bytes())


def rotate_certs(directory: Path, *, days: int = 365, new_ca: bool = False,
                 drop_old_ca: bool = False,
                 settle: Callable[[str], None] | None = None) -> list[Path]:
    """Re-issue every leaf (after making a new CA with `new_ca`), or, with `drop_old_ca`,
    remove every CA but the current one from `ca.crt`. Returns the files written.
    `settle(what)`, when given, waits for the services to load `what`: after the new bundle
    and after the leaves."""
    directory = Path(directory)
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    if new_ca and drop_old_ca:
        raise CertsError("choose one of --new-ca and --drop-old-ca")
    ca_cert_path, ca_key_path = directory / CA_CERT, directory / CA_KEY
    if not (ca_cert_path.exists() and ca_key_path.exists()):
        raise CertsError(f"{directory} has no CA ({CA_CERT}, {CA_KEY}); "
                         f"run `meshserve certs init {directory}` first")
    if drop_old_ca:
        return _drop_old_ca(directory)

    written: list[Path] = []
    if new_ca:
        cert_pem, key_pem = _build_ca(days)
        # Trust first: the bundle names the new CA (which signs from now on) and the old.
        _replace_files([(ca_key_path, key_pem, 0o600),
                        (ca_cert_path, cert_pem + ca_cert_path.read_bytes(), 0o644)])
        written += [ca_cert_path, ca_key_path]
        if settle is not None:
            settle("the new CA")
    ca_cert, ca_key = _load_ca(ca_cert_path, ca_key_path)
    for name in leaf_names():
        if name == CLIENT_NAME:
            cert_pem, key_pem = _build_leaf(ca_cert, ca_key, name, client_sans(), days, True)
        else:
            cert_pem, key_pem = _build_leaf(ca_cert, ca_key, name, identity_sans(name), days,
                                            False)
        crt, key = directory / f"{name}.crt", directory / f"{name}.key"
        _replace_files([(key, key_pem, 0o600), (crt, cert_pem, 0o644)])
        written += [crt, key]
    if settle is not None:
        settle("their new certificates")
    return written


def _drop_old_ca(directory: Path) -> list[Path]:
    ca_cert_path = directory / CA_CERT
    current, _ = _load_ca(ca_cert_path, directory / CA_KEY)
    stale = [name for name in leaf_names()
             if (directory / f"{name}.crt").exists()
             and not issued_by((directory / f"{name}.crt").read_bytes(), current)]
    if stale:
        raise CertsError(f"{', '.join(stale)} still have certificates from an old CA; "
                         f"run `meshserve certs rotate {directory}` first")
    if len(ca_bundle(directory)) == 1:
        return []
    _replace_files([(ca_cert_path, current.public_bytes(serialization.Encoding.PEM), 0o644)])
    return [ca_cert_path]


# --- command line ---------------------------------------------------------------------------


def _cmd_init(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    try:
        written = _init_certs(directory, args.days or DEFAULT_DAYS)
    except (CertsError, OSError, ValueError) as exc:
        print(f"certs init: {exc}", file=sys.stderr)
        return 1
    if written:
        for path in written:
            print(f"wrote {path}")
    else:
        print(f"nothing to do: every file already exists in {directory}")
    note = shortened_lifetime(directory, written, args.days)
    if note:
        print(note)
    print(f"CA: {directory / CA_CERT}")
    return 0


def _cmd_rotate(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    try:
        written = rotate_certs(directory, days=args.days or DEFAULT_DAYS, new_ca=args.new_ca,
                               drop_old_ca=args.drop_old_ca,
                               settle=_waiting(args.settle) if args.settle else None)
    except (CertsError, OSError, ValueError) as exc:
        print(f"certs rotate: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"nothing to do: {directory / CA_CERT} holds one CA")
    note = shortened_lifetime(directory, written, args.days)
    if note:
        print(note)
    return 0


def shortened_lifetime(directory: Path, written: Sequence[Path], days: int | None) -> str | None:
    """A line saying so when the leaves just written end before the `days` asked for (a leaf
    never outlives its CA); without `--days` (None: DEFAULT_DAYS), only when they end within
    SOON_DAYS, since a CA and its leaves made together end together."""
    leaves = [p for p in written if p.suffix == ".crt" and p.name != CA_CERT]
    if not leaves:
        return None
    now = datetime.datetime.now(datetime.UTC)
    asked = now + datetime.timedelta(days=days or DEFAULT_DAYS)
    ends = min(x509.load_pem_x509_certificate(p.read_bytes()).not_valid_after_utc
               for p in leaves)
    if ends >= asked - _BACKDATE or (days is None and
                                     ends >= now + datetime.timedelta(days=SOON_DAYS)):
        return None
    days = days or DEFAULT_DAYS
    return (f"warning: the new certificates expire on {ends:%Y-%m-%d %H:%M} UTC, when the CA "
            f"in {directory / CA_CERT} does, not on {asked:%Y-%m-%d %H:%M} UTC as --days {days} "
            f"asked; `meshserve certs rotate {directory} --new-ca --days {days}` makes a "
            "longer-lived CA")


def _waiting(seconds: float) -> Callable[[str], None]:
    def settle(what: str) -> None:
        print(f"waiting {seconds:g} s for every service to load {what}", flush=True)
        time.sleep(seconds)

    return settle


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `certs init DIR [--days N]` and `certs rotate DIR ...` to a command line."""
    certs = subparsers.add_parser("certs", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = certs.add_subparsers(dest="certs_command", metavar="COMMAND", required=True)
    init = commands.add_parser("init", help="create the CA and the certificates that are missing")
    init.add_argument("directory", metavar="DIR", type=Path, help="where the files go")
    init.add_argument("--days", type=positive_int, default=None,
                      help="validity of new certificates in days (default: 365)")
    init.set_defaults(func=_cmd_init)
    rotate = commands.add_parser(
        "rotate", help="re-issue every leaf (optionally from a new CA); services reload them")
    rotate.add_argument("directory", metavar="DIR", type=Path, help="the certificate directory")
    rotate.add_argument("--days", type=positive_int, default=None,
                        help="validity of the new certificates in days (default: 365)")
    which = rotate.add_mutually_exclusive_group()
    which.add_argument("--new-ca", action="store_true",
                       help="issue from a new CA; ca.crt trusts the new and the old CA")
    which.add_argument("--drop-old-ca", action="store_true",
                       help="only remove old CAs from ca.crt (after a --new-ca rotation)")
    rotate.add_argument("--settle", type=non_negative_float, default=SETTLE_S, metavar="SECONDS",
                        help="wait this long after the new CA and after the new leaves, for "
                             "the services to load them; they look every 2-3 s (default: "
                             f"{SETTLE_S:g}; 0: do not wait)")
    rotate.set_defaults(func=_cmd_rotate)
