"""`meshserve`: one command for every service and tool.

Each command imports only what it needs, when it runs: `meshserve traffic status` never loads
torch, and a script that calls `meshserve health` or `meshserve token issue` in a loop pays for
gRPC or cryptography alone. `meshserve --help` lists the commands without importing any.
"""

import argparse
import contextlib
import importlib
import os
import sys

from meshserve.common import grpc_engine

SERVICES = {
    "ingress": "meshserve.ingress.service",
    "router": "meshserve.router.service",
    "batcher": "meshserve.batcher.service",
    "compute": "meshserve.compute.service",
    "control-plane": "meshserve.mesh.service",
}

# command → (the module whose `register(commands)` adds it, what it does)
TOOLS = {
    "up": ("meshserve.tools.up", "run every service locally with a demo model"),
    "infer": ("meshserve.tools.client", "send one request and print the outputs"),
    "traffic": ("meshserve.tools.traffic", "see and shift traffic between versions"),
    "canary": ("meshserve.tools.traffic", "automated canary with rollback"),
    "certs": ("meshserve.tools.certs", "development certificates for the mesh"),
    "bench": ("meshserve.tools.bench",
              "load generator for Open Inference Protocol gRPC servers"),
    "health": ("meshserve.tools.health",
               "one grpc.health.v1 Check over mutual TLS; exit 0 only on SERVING"),
    "top": ("meshserve.tools.top", "live per-version rates, latency, queues, weights"),
    "models": ("meshserve.tools.models",
               "the model registry: push, list, show, fetch, verify, rewrap"),
    "audit": ("meshserve.tools.audit", "verify and read the tamper-evident audit log"),
    "token": ("meshserve.tools.tokens", "issue bearer tokens, rotate the signing key"),
    "backup": ("meshserve.tools.backup", "write a signed archive of the mesh's state"),
    "restore": ("meshserve.tools.restore", "restore a backup into an empty data directory"),
    "drill": ("meshserve.tools.drill", "back up, kill, wipe, restore and restart a running "
              "`meshserve up`, under load, and measure the recovery"),
}


def parser_for(command: str | None) -> argparse.ArgumentParser:
    """The command line with `command`'s module registered, or, for any other word, every
    command listed by name alone (for `--help` and for argparse's error on a typo)."""
    parser = argparse.ArgumentParser(prog="meshserve", description="A model-serving mesh.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command in TOOLS:
        importlib.import_module(TOOLS[command][0]).register(commands)
        return parser
    for name in SERVICES:
        commands.add_parser(name, help=f"run the {name} service (see meshserve {name} -h)")
    for name, (_, summary) in TOOLS.items():
        commands.add_parser(name, help=summary)
    return parser


# How a shell reports a command that SIGPIPE ended (128 + 13), as it ends `yes | head -1`.
SIGPIPE_STATUS = 141


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SERVICES:
        grpc_engine.use()  # before the service imports grpc
        return importlib.import_module(SERVICES[argv[0]]).main(argv[1:])
    args = parser_for(argv[0] if argv else None).parse_args(argv)
    try:
        code = args.func(args)
    except BrokenPipeError:  # the reader of its output has gone (`| head -1`): stop quietly
        return reader_gone(SIGPIPE_STATUS)
    try:
        sys.stdout.flush()  # here rather than at exit, where Python would complain
    except BrokenPipeError:  # the command had done its work
        return reader_gone(code)
    return code


def reader_gone(code: int) -> int:
    """`code`, once what is left to write goes nowhere (no second error at exit)."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


if __name__ == "__main__":
    sys.exit(main())
