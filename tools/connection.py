"""The flags by which an operator command reaches the control plane: `control_plane_address`
and `operator_tls` (meshserve.tools.traffic) read them. Kept apart so that a command can offer
them without importing gRPC."""

import argparse
from pathlib import Path


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=Path(".meshserve"),
                        help="where `meshserve up` keeps certificates and ports")
    parser.add_argument("--control-plane", help="HOST:PORT (default: the one `up` started)")
    parser.add_argument("--ca", type=Path)
    parser.add_argument("--cert", type=Path, help="operator certificate")
    parser.add_argument("--key", type=Path)
