"""`meshserve`: one command for every service and tool."""

import argparse
import importlib
import sys

SERVICES = {
    "ingress": "meshserve.ingress.service",
    "router": "meshserve.router.service",
    "batcher": "meshserve.batcher.service",
    "compute": "meshserve.compute.service",
    "control-plane": "meshserve.mesh.service",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SERVICES:
        return importlib.import_module(SERVICES[argv[0]]).main(argv[1:])
    from meshserve.tools import bench, certs, client, health, tokens, top, traffic, up

    parser = argparse.ArgumentParser(prog="meshserve", description="A model-serving mesh.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SERVICES:
        commands.add_parser(name, help=f"run the {name} service (see meshserve {name} -h)")
    up.register(commands)
    client.register(commands)
    traffic.register(commands)
    certs.register(commands)
    bench.register(commands)
    health.register(commands)
    top.register(commands)
    for tool in ("models", "audit", "backup", "restore", "drill"):
        importlib.import_module(f"meshserve.tools.{tool}").register(commands)
    tokens.register(commands)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
