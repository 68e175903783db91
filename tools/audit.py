"""`meshserve audit …`: the control plane's tamper-evident audit log.

    verify [--anchor HASH] [--store PATH]   check the hash chain; exit 1 and one line per
                                            problem; prints the head hash to export as the
                                            next anchor
    tail [-n N] [--follow]                  print the newest events (and then new ones)

Over the admin API (mutual TLS, operator certificate) by default; `verify --store` reads the
store directly (a SQLite file or a postgresql:// URL), for when the control plane is down.
"""

import argparse
import asyncio
import sys

import grpc

from meshserve.common.errors import FailedPrecondition, ServingError
from meshserve.protocol import admin_pb2 as pb
from meshserve.protocol.admin_pb2_grpc import AdminStub
from meshserve.tools.checks import verdict
from meshserve.tools.connection import add_connection_flags
from meshserve.tools.traffic import admin_channel, control_plane_address, operator_tls

FOLLOW_INTERVAL_S = 1.0
INT32_MAX = 2**31 - 1  # AuditRequest.limit is an int32


def non_negative_int(text: str) -> int:
    """`-n`: a whole number of at least 0 (argparse reports the error naming the flag)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0, not '{text}'")
    return value


def format_entry(entry) -> str:
    reason = f"  ({entry.reason})" if entry.reason else ""
    return (f"{entry.seq:>6} {entry.at} {entry.actor:<18} {entry.action:<16} "
            f"{entry.subject}{reason}  {entry.hash[:12]}")


def report(problems: list[str], count: int, head: str) -> int:
    return verdict(problems, f"audit log intact: {count} entries; head {head}")


def verify_store(args: argparse.Namespace) -> int:
    from meshserve.mesh.database_urls import missing_store_file
    from meshserve.mesh.store import Store

    missing = missing_store_file(args.store)
    if missing:  # verifying must not create an empty store and find it intact
        raise FailedPrecondition(f"no store at {missing}")
    with Store.open(args.store) as store:
        entries = store.audit()
        problems = store.verify_audit(anchor=args.anchor or None)
    return report(problems, len(entries), entries[-1].hash if entries else "-")


async def verify_remote(args: argparse.Namespace) -> int:
    async with admin_channel(control_plane_address(args), operator_tls(args)) as channel:
        reply = await AdminStub(channel).Audit(pb.AuditRequest(verify=True,
                                                               anchor=args.anchor or ""))
    entries = reply.entries
    return report(list(reply.problems), len(entries), entries[-1].hash if entries else "-")


async def tail(args: argparse.Namespace) -> int:
    async with admin_channel(control_plane_address(args), operator_tls(args)) as channel:
        await print_tail(AdminStub(channel), args.n, args.follow)
    return 0


async def print_tail(admin, n: int, follow: bool, out=None) -> None:
    """The newest `n` entries (none for 0), then, when `follow`, each new one as it comes.
    It asks for at least one: to the server, a limit of 0 means every entry."""
    out = out or (lambda line: print(line, flush=True))
    reply = await admin.Audit(pb.AuditRequest(limit=min(max(n, 1), INT32_MAX)))
    last = reply.entries[-1].seq if reply.entries else 0
    for entry in list(reply.entries)[-n:] if n else []:
        out(format_entry(entry))
    while follow:
        await asyncio.sleep(FOLLOW_INTERVAL_S)
        reply = await admin.Audit(pb.AuditRequest(after_seq=last))
        for entry in reply.entries:
            if entry.seq > last:
                out(format_entry(entry))
                last = entry.seq


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "verify":
            return verify_store(args) if args.store else asyncio.run(verify_remote(args))
        return asyncio.run(tail(args))
    except grpc.aio.AioRpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 2
    except ServingError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def register(commands) -> None:
    audit = commands.add_parser("audit")
    actions = audit.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("verify", help="check the hash chain (exit 1 on problems)")
    check.add_argument("--anchor", default="", metavar="HASH",
                       help="a head hash exported earlier: it must still be in the log")
    check.add_argument("--store", default="",
                       help="read this store directly instead of asking the control plane")
    tail_parser = actions.add_parser("tail", help="print the newest events")
    tail_parser.add_argument("-n", type=non_negative_int, default=20,
                             help="how many (default 20; 0: none, with --follow only new ones)")
    tail_parser.add_argument("--follow", action="store_true", help="then print new events")
    for parser in (check, tail_parser):
        add_connection_flags(parser)
        parser.set_defaults(func=run)
