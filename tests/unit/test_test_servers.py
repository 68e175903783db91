"""The servers the tests start come from this environment (the test extra's wheels), never
from the system: PostgreSQL, Redis and Node.js resolve inside `sys.prefix`, and run."""

import subprocess
import sys
from pathlib import Path

from tests.crd_schemas import node_and_npm
from tests.integration.test_cache import redis_server
from tests.postgres import postgres_bin

PREFIX = Path(sys.prefix).resolve()


def version_of(*command: Path | str) -> str:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True,
                          timeout=30, check=True)
    return done.stdout.strip()


def test_postgresql_is_the_environments():
    bin_dir = postgres_bin()
    assert bin_dir.resolve().is_relative_to(PREFIX), bin_dir
    assert version_of(bin_dir / "initdb", "--version").startswith("initdb (PostgreSQL) ")


def test_redis_is_the_environments():
    binary = redis_server()
    assert binary.resolve().is_relative_to(PREFIX), binary
    assert version_of(binary, "--version").startswith("Redis server v=")


def test_node_and_npm_are_the_environments():
    node, npm = node_and_npm()
    assert node.resolve().is_relative_to(PREFIX) and npm.resolve().is_relative_to(PREFIX)
    assert version_of(node, "--version").startswith("v")
    assert version_of(node, npm, "--version")[0].isdigit()
