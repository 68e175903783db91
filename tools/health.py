"""`meshserve health HOST:PORT`: one grpc.health.v1 Check over mutual TLS, for people.

    meshserve health localhost:7004 --tls-cert tls.crt --tls-key tls.key --tls-ca ca.crt \\
        [--identity compute] [--service NAME] [--timeout 2]

Every serving port of the mesh speaks only mutual TLS, so this asks a service what the
kubelet learns from its health-only HTTP port (`--health-listen`: `/readyz`, `/livez`; see
meshserve.common.probes), with a certificate of the mesh, from anywhere the port is reachable.

It prints the status (`SERVING`, `NOT_SERVING` with the reason the service gives, if any,
or the RPC's error, e.g. `UNAVAILABLE: ...`)
and exits 0 only on SERVING, 1 otherwise, 2 on a usage error (a malformed address, a
certificate file that cannot be read).

`--identity` is the name the server's certificate must carry (the TLS target name); by
default the identity in `--tls-cert`'s SPIFFE URI, which is right for a pod checking itself.
"""

import argparse
import asyncio
import re
import socket
import ssl
import sys
from pathlib import Path

import grpc

from meshserve.common.tls import TlsFiles, secure_channel
from meshserve.protocol import health_pb2
from meshserve.protocol.health_pb2_grpc import HealthStub

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1
EXIT_USAGE = 2

# How gRPC words a server certificate that does not name the identity asked for.
WRONG_NAME = "Hostname Verification Check failed"

_ADDRESS = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[^\s:\[\]/]+):(?P<port>[0-9]{1,5})$")


class UsageError(Exception):
    """The command cannot run as asked; exit status 2."""


def parse_address(address: str) -> str:
    """`HOST:PORT` (`[v6]:PORT` for IPv6) with a port in 1..65535, else UsageError."""
    match = _ADDRESS.match(address)
    if match is None or not 1 <= int(match["port"]) <= 65535:
        raise UsageError(f"address {address!r} is not HOST:PORT")
    return address


def own_identity(cert: Path) -> str:
    """The identity in a certificate's SPIFFE URI (`spiffe://meshserve.local/<identity>`)."""
    from meshserve.common.certificates import identity_of  # cryptography: when needed

    identity = identity_of(cert.read_bytes())
    if not identity:
        raise UsageError(f"{cert} names no meshserve identity (no spiffe://meshserve.local/ "
                         "URI); pass --identity")
    return identity


async def check(address: str, tls: TlsFiles, identity: str, service: str,
                timeout: float) -> tuple[int, str]:
    """(exit status, what to print) of one Check, bounded by `timeout` seconds."""
    channel = secure_channel(address, tls, identity)
    try:
        reply = await HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.aio.AioRpcError as error:
        details = error.details() or ""
        if WRONG_NAME in details:
            details = await asyncio.to_thread(wrong_identity, address, tls, identity, timeout)
        return EXIT_NOT_SERVING, f"{error.code().name}: {details}"
    finally:
        await channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving and reply.reason:  # a compute that refused its model, and its batcher
        status = f"{status}: {reply.reason}"
    return (EXIT_SERVING if serving else EXIT_NOT_SERVING), status


def wrong_identity(address: str, tls: TlsFiles, identity: str, timeout: float) -> str:
    """What to say when the server's certificate does not name `identity`: the name it
    carries instead, read from a TLS handshake of our own (the mesh CA and our certificate,
    no name check), or, when that fails too, only which identity was expected."""
    expected = (f"not the expected identity '{identity}' (--identity, by default the one in "
                "--tls-cert; TLS hostname verification failed)")
    try:
        names = served_names(address, tls, timeout)
    except (OSError, ValueError):
        return f"the server's certificate does not name '{identity}': {expected}"
    if names.identity:
        return (f"the server's certificate names '{names.identity}', {expected}; "
                f"`--identity {names.identity}` checks it as that")
    shown = ", ".join(names.dns) or names.common_name or "nothing"
    return f"the server's certificate names {shown}, {expected}"


def served_names(address: str, tls: TlsFiles, timeout: float):
    """The names in the certificate the server at `address` presents to ours."""
    from meshserve.common.certificates import names_of  # cryptography: when needed

    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the point: see which name it carries
    context.load_verify_locations(cafile=tls.ca)
    context.load_cert_chain(tls.cert, tls.key)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw, \
            context.wrap_socket(raw) as connection:
        der = connection.getpeercert(binary_form=True)
    if not der:
        raise ValueError("the server presented no certificate")
    return names_of(ssl.DER_cert_to_PEM_cert(der))


def run(args: argparse.Namespace) -> int:
    try:
        address = parse_address(args.address)
        if not args.timeout > 0:
            raise UsageError(f"--timeout must be positive, got {args.timeout:g}")
        tls = TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
        for path in (tls.cert, tls.key, tls.ca):
            if not Path(path).is_file():
                raise UsageError(f"cannot read {path}")
        identity = args.identity or own_identity(Path(tls.cert))
        code, text = asyncio.run(check(address, tls, identity, args.service, args.timeout))
    except (UsageError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(text, flush=True)
    return code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="HOST:PORT", help="the service's mutual-TLS port")
    parser.add_argument("--tls-cert", type=Path, required=True,
                        help="the certificate to present (PEM)")
    parser.add_argument("--tls-key", type=Path, required=True, help="its private key (PEM)")
    parser.add_argument("--tls-ca", type=Path, required=True,
                        help="CA the server's certificate must chain to (PEM)")
    parser.add_argument("--identity", default="",
                        help="identity the server's certificate must name (default: the one "
                             "in --tls-cert, for a pod probing itself)")
    parser.add_argument("--service", default="",
                        help="grpc.health.v1 service name (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=2.0,
                        help="seconds the check may take (default 2)")
    parser.set_defaults(func=run)


def register(commands) -> None:
    parser = commands.add_parser("health", description=__doc__.split("\n\n")[0])
    add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshserve health",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
